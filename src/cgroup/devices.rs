//! Device access policy on cgroup v2: the OCI spec's
//! linux.resources.devices rules compiled into a BPF_PROG_TYPE_CGROUP_DEVICE
//! program (cgroup v2 has no devices.allow/deny files). Loading and
//! attaching it is src/linux/bpf.rs's job; this is the rule -> instruction
//! mapping, kept apart so it can be checked without a kernel.
//!
//! Semantics are cgroup v1's: rules apply in order and the last one that
//! matches a request decides; nothing matching means deny. So the rules
//! are emitted last first, each a block that returns its verdict when it
//! matches. An allow rule matches when every access bit of the request is
//! in the rule ("r" does not allow an open for read+write); a deny rule
//! matches when any is ("w" denied refuses read+write). Two allow rules
//! that only together cover a request's bits do not allow it (as in runc).

use crate::linux::bpf::op::*;
use crate::linux::bpf::Insn;
use oci_spec::runtime::{LinuxDeviceCgroup, LinuxDeviceType};
use serde::{Deserialize, Serialize};

/// The name every container's program is loaded with: how berth finds its
/// own program on a cgroup (to replace it) and how tests and bpftool see it.
pub const PROGRAM_NAME: &str = "berth_devices";

/// What berth does when a container's device policy cannot be attached
/// (no usable cgroup v2, or the kernel refuses the program).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Enforcement {
    /// Refuse to create the (non-privileged) container.
    #[default]
    Required,
    /// Run it without one, with a warning: every device node the container
    /// can create or is given is then only guarded by file permissions.
    BestEffort,
}

/// struct bpf_cgroup_dev_ctx: access_type (type in the low 16 bits, access
/// in the high ones), major, minor.
const CTX_ACCESS_TYPE: i16 = 0;
const CTX_MAJOR: i16 = 4;
const CTX_MINOR: i16 = 8;
const DEV_BLOCK: i32 = 1;
const DEV_CHAR: i32 = 2;
const ACC_MKNOD: i32 = 1;
const ACC_READ: i32 = 2;
const ACC_WRITE: i32 = 4;
const ACC_ALL: i32 = ACC_MKNOD | ACC_READ | ACC_WRITE;

/// Largest numbers Linux device numbers have (12-bit major, 20-bit minor).
const MAX_MAJOR: i64 = 0xfff;
const MAX_MINOR: i64 = 0xf_ffff;

/// The access bits of "rwm"-style permissions; `None` (not given) is all.
fn access_bits(access: Option<&str>) -> Result<i32, String> {
    let Some(a) = access else {
        return Ok(ACC_ALL);
    };
    a.chars().try_fold(0, |bits, c| match c {
        'r' => Ok(bits | ACC_READ),
        'w' => Ok(bits | ACC_WRITE),
        'm' => Ok(bits | ACC_MKNOD),
        _ => Err(format!(
            "device rule access {a:?}: not a combination of r, w and m"
        )),
    })
}

fn number(what: &str, v: Option<i64>, max: i64) -> Result<Option<i32>, String> {
    match v {
        None | Some(-1) => Ok(None),
        Some(n) if (0..=max).contains(&n) => Ok(Some(n as i32)),
        Some(n) => Err(format!(
            "device rule {what} {n} is out of range (0..={max})"
        )),
    }
}

/// Compiles `rules` into the program. r2 = type, r3 = access, r4 = major,
/// r5 = minor; r1 is scratch once the context is read.
pub fn program(rules: &[LinuxDeviceCgroup]) -> Result<Vec<Insn>, String> {
    let mut insns = vec![
        Insn::new(LDX_W, R2, R1, CTX_ACCESS_TYPE, 0),
        Insn::new(AND32_K, R2, 0, 0, 0xffff),
        Insn::new(LDX_W, R3, R1, CTX_ACCESS_TYPE, 0),
        Insn::new(RSH32_K, R3, 0, 0, 16),
        Insn::new(LDX_W, R4, R1, CTX_MAJOR, 0),
        Insn::new(LDX_W, R5, R1, CTX_MINOR, 0),
    ];
    for rule in rules.iter().rev() {
        let typ = match rule.typ().unwrap_or_default() {
            LinuxDeviceType::A => None,
            LinuxDeviceType::B => Some(DEV_BLOCK),
            LinuxDeviceType::C | LinuxDeviceType::U => Some(DEV_CHAR),
            LinuxDeviceType::P => {
                return Err("device rule of type p (FIFO): not a device type".into())
            }
        };
        let access = access_bits(rule.access().as_deref())?;
        let major = number("major", rule.major(), MAX_MAJOR)?;
        let minor = number("minor", rule.minor(), MAX_MINOR)?;
        if access == 0 {
            // Grants or refuses nothing (runc reads "" the same way).
            continue;
        }
        // Each condition jumps past the block when it fails; the offsets
        // are filled in once the block's length is known.
        let mut block = Vec::new();
        if let Some(t) = typ {
            block.push(Insn::new(JNE_K, R2, 0, 0, t));
        }
        // Every request has at least one access bit: a deny of all three,
        // or an allow of all three, needs no access test.
        if access != ACC_ALL {
            block.push(Insn::new(MOV32_X, R1, R3, 0, 0));
            block.push(Insn::new(AND32_K, R1, 0, 0, access));
            if rule.allow() {
                // (access & rule) != access: some bit is not granted
                block.push(Insn::new(JNE_X, R1, R3, 0, 0));
            } else {
                // (access & rule) == 0: no bit is denied
                block.push(Insn::new(JEQ_K, R1, 0, 0, 0));
            }
        }
        if let Some(m) = major {
            block.push(Insn::new(JNE_K, R4, 0, 0, m));
        }
        if let Some(m) = minor {
            block.push(Insn::new(JNE_K, R5, 0, 0, m));
        }
        let conditional = !block.is_empty();
        block.push(Insn::new(MOV32_K, R0, 0, 0, i32::from(rule.allow())));
        block.push(Insn::new(EXIT, 0, 0, 0, 0));
        let len = block.len();
        for (i, insn) in block.iter_mut().enumerate() {
            if matches!(insn.code, JNE_K | JNE_X | JEQ_K) {
                insn.off = (len - i - 1) as i16;
            }
        }
        insns.extend(block);
        if !conditional {
            // Matches every request: the rules before it can never decide
            // (and the verifier refuses unreachable code).
            return Ok(insns);
        }
    }
    insns.push(Insn::new(MOV32_K, R0, 0, 0, 0));
    insns.push(Insn::new(EXIT, 0, 0, 0, 0));
    Ok(insns)
}

/// Whether this kernel loads device programs for berth (CONFIG_CGROUP_BPF,
/// CAP_BPF or CAP_SYS_ADMIN), for `berth check`.
pub fn loadable() -> Result<(), String> {
    let mut all = LinuxDeviceCgroup::default();
    all.set_allow(true);
    let insns = program(&[all])?;
    crate::linux::bpf::DeviceProgram::load(PROGRAM_NAME, &insns)
        .map(drop)
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use oci_spec::runtime::LinuxDeviceCgroupBuilder;

    fn rule(
        allow: bool,
        typ: LinuxDeviceType,
        major: i64,
        minor: i64,
        acc: &str,
    ) -> LinuxDeviceCgroup {
        let mut b = LinuxDeviceCgroupBuilder::default()
            .allow(allow)
            .typ(typ)
            .access(acc);
        if major >= 0 {
            b = b.major(major);
        }
        if minor >= 0 {
            b = b.minor(minor);
        }
        b.build().unwrap()
    }

    /// A tiny interpreter of exactly the instructions `program` emits, so
    /// the mapping is checked by behaviour (the kernel cannot test-run
    /// device programs) as well as by shape.
    fn run(insns: &[Insn], typ: i32, access: i32, major: i32, minor: i32) -> i32 {
        let ctx = [(typ | (access << 16)) as u32, major as u32, minor as u32];
        let mut r = [0u64; 11];
        let mut pc = 0usize;
        loop {
            let i = insns[pc];
            let (d, s) = (i.dst() as usize, i.src() as usize);
            pc += 1;
            match i.code {
                LDX_W => {
                    assert_eq!(s, 1, "loads come from the context");
                    r[d] = u64::from(ctx[(i.off / 4) as usize]);
                }
                AND32_K => r[d] = (r[d] as u32 & i.imm as u32) as u64,
                RSH32_K => r[d] = ((r[d] as u32) >> i.imm) as u64,
                MOV32_K => r[d] = i.imm as u32 as u64,
                MOV32_X => r[d] = r[s] as u32 as u64,
                JNE_K if r[d] != i.imm as i64 as u64 => pc += i.off as usize,
                JEQ_K if r[d] == i.imm as i64 as u64 => pc += i.off as usize,
                JNE_X if r[d] != r[s] => pc += i.off as usize,
                JNE_K | JEQ_K | JNE_X => {}
                EXIT => return r[0] as i32,
                c => panic!("unexpected opcode {c:#x}"),
            }
        }
    }

    const R: i32 = ACC_READ;
    const W: i32 = ACC_WRITE;
    const M: i32 = ACC_MKNOD;

    #[test]
    fn default_deny_standard_allows_and_requested_permissions() {
        use LinuxDeviceType::*;
        let rules = vec![
            rule(false, A, -1, -1, "rwm"),
            rule(true, C, -1, -1, "m"),
            rule(true, B, -1, -1, "m"),
            rule(true, C, 1, 3, "rwm"),
            rule(true, C, 136, -1, "rwm"),
            rule(true, B, 7, 1, "r"),
        ];
        let p = program(&rules).unwrap();
        // The prologue, then one block per rule, last rule first: b 7:1 r
        // (type, access, major, minor), c 136:* (type, major), c 1:3
        // (type, major, minor), b *:* m and c *:* m (type, access), and
        // the unconditional deny.
        assert_eq!(p.len(), 6 + 8 + 4 + 5 + 6 + 6 + 2);
        assert_eq!(p.last().unwrap().code, EXIT);
        let ok = |t, a, ma, mi| run(&p, t, a, ma, mi);
        assert_eq!(ok(DEV_CHAR, R | W, 1, 3), 1, "/dev/null rw");
        assert_eq!(ok(DEV_CHAR, R, 1, 4), 0, "/dev/port");
        assert_eq!(ok(DEV_CHAR, R | W, 136, 7), 1, "a pts");
        assert_eq!(ok(DEV_BLOCK, M, 8, 0), 1, "mknod of a disk");
        assert_eq!(ok(DEV_BLOCK, R, 8, 0), 0, "reading a disk");
        assert_eq!(ok(DEV_BLOCK, R, 7, 1), 1, "the requested device, read");
        assert_eq!(ok(DEV_BLOCK, W, 7, 1), 0, "... written");
        assert_eq!(ok(DEV_BLOCK, R | W, 7, 1), 0, "... read+write");
        assert_eq!(ok(DEV_CHAR, R, 7, 1), 0, "same numbers, other type");
    }

    #[test]
    fn last_matching_rule_wins_and_deny_matches_any_bit() {
        use LinuxDeviceType::*;
        let p = program(&[rule(true, A, -1, -1, "rwm"), rule(false, C, 1, 3, "w")]).unwrap();
        assert_eq!(run(&p, DEV_CHAR, R, 1, 3), 1);
        assert_eq!(run(&p, DEV_CHAR, R | W, 1, 3), 0);
        assert_eq!(run(&p, DEV_BLOCK, W, 1, 3), 1);
        // The allow-all rule ends the program: nothing after it.
        assert_eq!(
            &p[p.len() - 2..],
            &[Insn::new(MOV32_K, R0, 0, 0, 1), Insn::new(EXIT, 0, 0, 0, 0)]
        );
    }

    #[test]
    fn privileged_is_one_unconditional_allow() {
        let mut all = LinuxDeviceCgroup::default();
        all.set_allow(true);
        let p = program(&[all]).unwrap();
        assert_eq!(p.len(), 8);
        assert_eq!(run(&p, DEV_BLOCK, R | W, 8, 0), 1);
    }

    #[test]
    fn bad_rules_are_errors() {
        use LinuxDeviceType::*;
        assert!(program(&[rule(true, C, 1, 3, "rx")])
            .unwrap_err()
            .contains("\"rx\""));
        assert!(program(&[rule(true, C, 5000, 3, "r")])
            .unwrap_err()
            .contains("major"));
        assert!(program(&[rule(true, P, 1, 3, "r")]).is_err());
        // No access at all grants nothing.
        let p = program(&[rule(true, C, 1, 3, "")]).unwrap();
        assert_eq!(run(&p, DEV_CHAR, R, 1, 3), 0);
    }

    #[test]
    fn the_kernel_accepts_the_programs() {
        use LinuxDeviceType::*;
        for rules in [
            vec![
                rule(false, A, -1, -1, "rwm"),
                rule(true, C, 1, 3, "rwm"),
                rule(true, B, 7, 1, "r"),
            ],
            vec![rule(true, A, -1, -1, "rwm")],
            vec![rule(true, A, -1, -1, "rwm"), rule(false, B, -1, -1, "rw")],
            vec![],
        ] {
            let p = program(&rules).unwrap();
            crate::linux::bpf::DeviceProgram::load(PROGRAM_NAME, &p)
                .unwrap_or_else(|e| panic!("{rules:?}: {e}"));
        }
    }
}
