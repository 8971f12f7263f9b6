//! OCI seccomp section -> BPF programs (compiled with seccompiler), and the
//! raw syscall that installs them.
//!
//! seccompiler filters have one action for every rule that matches and one
//! for the rest, while an OCI profile gives each rule its own action. The
//! profile therefore becomes a stack of filters, which the kernel runs all of,
//! keeping the most restrictive answer (and, among equal actions, the one of
//! the filter installed last):
//! - first, "every syscall any rule names (with its argument conditions) is
//!   allowed, everything else gets the default action";
//! - then one filter per other action: "these rules get this action,
//!   everything else is allowed".
//!
//! The result equals the profile's for allowlists and blocklists, and for
//! overlapping rules the stricter one wins.

use oci_spec::runtime::{LinuxSeccomp, LinuxSeccompAction, LinuxSeccompOperator};
use seccompiler::{BpfProgram, TargetArch};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

/// Whether a syscall name is in the target's table. Names it lacks (32-bit
/// calls of a profile written for several architectures) are skipped.
static KNOWN: Mutex<BTreeMap<String, bool>> = Mutex::new(BTreeMap::new());

fn target() -> TargetArch {
    if cfg!(target_arch = "aarch64") {
        TargetArch::aarch64
    } else if cfg!(target_arch = "riscv64") {
        TargetArch::riscv64
    } else {
        TargetArch::x86_64
    }
}

/// An action as seccompiler's JSON spells it.
fn action(a: LinuxSeccompAction, errno: Option<u32>) -> Result<Value, String> {
    Ok(match a {
        LinuxSeccompAction::ScmpActAllow => json!("allow"),
        LinuxSeccompAction::ScmpActErrno => json!({"errno": errno.unwrap_or(libc::EPERM as u32)}),
        LinuxSeccompAction::ScmpActKill | LinuxSeccompAction::ScmpActKillThread => {
            json!("kill_thread")
        }
        LinuxSeccompAction::ScmpActKillProcess => json!("kill_process"),
        LinuxSeccompAction::ScmpActTrap => json!("trap"),
        LinuxSeccompAction::ScmpActLog => json!("log"),
        LinuxSeccompAction::ScmpActTrace => json!({"trace": errno.unwrap_or(0)}),
        LinuxSeccompAction::ScmpActNotify => {
            return Err("seccomp action SCMP_ACT_NOTIFY is not supported".into())
        }
    })
}

/// One rule's argument conditions in seccompiler's JSON (all must hold).
fn conditions(args: &[oci_spec::runtime::LinuxSeccompArg]) -> Result<Vec<Value>, String> {
    args.iter()
        .map(|a| {
            if a.index() > 5 {
                return Err(format!("seccomp argument index {} is above 5", a.index()));
            }
            let (op, val) = match a.op() {
                LinuxSeccompOperator::ScmpCmpNe => (json!("ne"), a.value()),
                LinuxSeccompOperator::ScmpCmpLt => (json!("lt"), a.value()),
                LinuxSeccompOperator::ScmpCmpLe => (json!("le"), a.value()),
                LinuxSeccompOperator::ScmpCmpEq => (json!("eq"), a.value()),
                LinuxSeccompOperator::ScmpCmpGe => (json!("ge"), a.value()),
                LinuxSeccompOperator::ScmpCmpGt => (json!("gt"), a.value()),
                // OCI (like libseccomp) gives the mask in `value` and the
                // datum in `valueTwo`.
                LinuxSeccompOperator::ScmpCmpMaskedEq => {
                    (json!({"masked_eq": a.value()}), a.value_two().unwrap_or(0))
                }
            };
            Ok(json!({"index": a.index(), "type": "qword", "op": op, "val": val}))
        })
        .collect()
}

/// Rules grouped per syscall: `None` = unconditional, else alternatives.
type RuleSet = BTreeMap<String, Option<Vec<Vec<Value>>>>;

fn add_rule(set: &mut RuleSet, name: &str, conds: Vec<Value>) {
    let entry = set.entry(name.to_string()).or_insert(Some(Vec::new()));
    match (entry.as_mut(), conds.is_empty()) {
        (None, _) => {}
        (Some(_), true) => *entry = None,
        (Some(v), false) => v.push(conds),
    }
}

fn filter_json(
    rules: &RuleSet,
    matched: &Value,
    mismatched: &Value,
    skip: &BTreeSet<String>,
) -> Value {
    let mut list = Vec::new();
    for (name, alts) in rules {
        if skip.contains(name) {
            continue;
        }
        match alts {
            None => list.push(json!({"syscall": name})),
            Some(alts) => {
                for c in alts {
                    list.push(json!({"syscall": name, "args": c}));
                }
            }
        }
    }
    json!({"mismatch_action": mismatched, "match_action": matched, "filter": list})
}

/// Compiles the profile into filters to install in order. An empty result
/// means nothing to install (a profile allowing everything).
pub fn compile(profile: &LinuxSeccomp) -> Result<Vec<BpfProgram>, String> {
    let default = action(profile.default_action(), profile.default_errno_ret())?;
    let allow = json!("allow");
    let mut base: RuleSet = BTreeMap::new();
    // Per non-allow action (as JSON text, to group equal ones).
    let mut by_action: BTreeMap<String, (Value, RuleSet)> = BTreeMap::new();
    for sc in profile.syscalls().as_deref().unwrap_or(&[]) {
        let act = action(sc.action(), sc.errno_ret())?;
        let conds = conditions(sc.args().as_deref().unwrap_or(&[]))?;
        for name in sc.names() {
            if act != allow {
                let slot = by_action
                    .entry(act.to_string())
                    .or_insert_with(|| (act.clone(), BTreeMap::new()));
                add_rule(&mut slot.1, name, conds.clone());
            }
            add_rule(&mut base, name, conds.clone());
        }
    }
    let mut filters: Vec<(Value, RuleSet, Value)> = Vec::new();
    if default != allow {
        filters.push((allow.clone(), base, default));
    }
    // Rules whose action equals the default get a filter too: the base
    // filter allows every named syscall.
    for (_, (act, rules)) in by_action {
        filters.push((act, rules, allow.clone()));
    }
    let mut out = Vec::new();
    for (i, (matched, rules, mismatched)) in filters.iter().enumerate() {
        out.push(compile_one(i, rules, matched, mismatched)?);
    }
    Ok(out)
}

fn compile_one(
    i: usize,
    rules: &RuleSet,
    matched: &Value,
    mismatched: &Value,
) -> Result<BpfProgram, String> {
    let name = format!("f{i}");
    let build = |skip: &BTreeSet<String>| {
        let doc = json!({ &name: filter_json(rules, matched, mismatched, skip) });
        seccompiler::compile_from_json(doc.to_string().as_bytes(), target())
    };
    // Profiles berth wrote hold known names only: one compile. Otherwise the
    // unknown names are found one by one and left out.
    let map = match build(&BTreeSet::new()) {
        Ok(m) => m,
        Err(_) => {
            let skip: BTreeSet<String> = rules.keys().filter(|n| !known(n)).cloned().collect();
            build(&skip).map_err(|e| format!("seccomp: {e}"))?
        }
    };
    map.into_iter()
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
        .ok_or_else(|| "seccomp: the compiler returned no filter".to_string())
}

/// The profile without the syscall names this architecture lacks.
pub fn known_only(profile: &LinuxSeccomp) -> LinuxSeccomp {
    let mut p = profile.clone();
    if let Some(list) = p.syscalls().clone() {
        let kept: Vec<_> = list
            .into_iter()
            .filter_map(|mut sc| {
                let names: Vec<String> = sc.names().iter().filter(|n| known(n)).cloned().collect();
                if names.is_empty() {
                    return None;
                }
                sc.set_names(names);
                Some(sc)
            })
            .collect();
        p.set_syscalls(Some(kept));
    }
    p
}

/// Whether the target's syscall table has `name` (seccompiler does not
/// export its table: a one-rule filter is compiled to find out, once).
fn known(name: &str) -> bool {
    if let Some(k) = crate::store::lock(&KNOWN).get(name) {
        return *k;
    }
    let doc = json!({"t": {"mismatch_action": "allow", "match_action": "log",
                           "filter": [{"syscall": name}]}});
    let ok = seccompiler::compile_from_json(doc.to_string().as_bytes(), target()).is_ok();
    crate::store::lock(&KNOWN).insert(name.to_string(), ok);
    ok
}

/// Installs `filters` on the calling thread in order. Raw syscalls only (safe
/// between clone and exec in a multi-threaded process). Needs no_new_privs or
/// CAP_SYS_ADMIN. Returns the errno of the failing call.
///
/// Hand-written rather than seccompiler's `apply_filter`, which always sets
/// no_new_privs (a container may run without it) and allocates an error.
pub fn install(filters: &[BpfProgram]) -> Result<(), i32> {
    for f in filters {
        let prog = libc::sock_fprog {
            len: f.len() as u16,
            filter: f.as_ptr() as *mut libc::sock_filter,
        };
        // SAFETY: `prog` points at a live, well-formed BPF program (built by
        // seccompiler); the kernel copies it during the call.
        let r = unsafe {
            libc::syscall(
                libc::SYS_seccomp,
                libc::SECCOMP_SET_MODE_FILTER,
                0 as libc::c_ulong,
                &prog as *const libc::sock_fprog,
            )
        };
        if r != 0 {
            return Err(std::io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EINVAL));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile(v: Value) -> LinuxSeccomp {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn allowlist_is_one_filter() {
        let p = profile(json!({
            "defaultAction": "SCMP_ACT_ERRNO",
            "syscalls": [{"names": ["read", "write", "chown32"], "action": "SCMP_ACT_ALLOW"}]
        }));
        let f = compile(&p).unwrap();
        assert_eq!(f.len(), 1);
        assert!(!known("chown32") && known("read"));
    }

    #[test]
    fn per_rule_actions_stack() {
        let p = profile(json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [
                {"names": ["sethostname"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1},
                {"names": ["personality"], "action": "SCMP_ACT_KILL_PROCESS",
                 "args": [{"index": 0, "value": 255, "valueTwo": 1, "op": "SCMP_CMP_MASKED_EQ"}]}
            ]
        }));
        assert_eq!(compile(&p).unwrap().len(), 2);
    }

    #[test]
    fn notify_is_refused() {
        let p = profile(json!({"defaultAction": "SCMP_ACT_NOTIFY"}));
        assert!(compile(&p).unwrap_err().contains("NOTIFY"));
    }
}
