//! A pod's user namespace as kubelet asks for it (hostUsers: false): the
//! uid/gid mappings, their validation, and the rule that no two live pods
//! share host ids. The mappings are part of the pod record on disk, so the
//! overlap check survives daemon restarts.

use serde::{Deserialize, Serialize};

/// The kernel accepts at most this many lines in uid_map/gid_map.
const MAX_MAP_LINES: usize = 340;

/// One range: `length` ids from `container_id` inside map to `host_id` on the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdRange {
    pub container_id: u32,
    pub host_id: u32,
    pub length: u32,
}

impl IdRange {
    fn end(start: u32, length: u32) -> u64 {
        start as u64 + length as u64
    }
}

/// The pod's mappings (CRI UserNamespace with mode POD).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserNsSpec {
    pub uids: Vec<IdRange>,
    pub gids: Vec<IdRange>,
}

impl UserNsSpec {
    /// Refuses mappings the kernel would refuse or that would leave the
    /// container without a root: empty, zero-length or overflowing ranges,
    /// ranges overlapping each other (inside or on the host), no container id 0.
    pub fn validate(&self) -> Result<(), String> {
        for (kind, map) in [("uid", &self.uids), ("gid", &self.gids)] {
            if map.is_empty() {
                return Err(format!("user namespace has no {kind} mappings"));
            }
            if map.len() > MAX_MAP_LINES {
                return Err(format!(
                    "user namespace has {} {kind} mappings, the kernel takes at most {MAX_MAP_LINES}",
                    map.len()
                ));
            }
            for r in map {
                if r.length == 0 {
                    return Err(format!("{kind} mapping {r:?} has length 0"));
                }
                // An id of u32::MAX is the kernel's "invalid id": never mappable.
                if IdRange::end(r.container_id, r.length) > u32::MAX as u64
                    || IdRange::end(r.host_id, r.length) > u32::MAX as u64
                {
                    return Err(format!("{kind} mapping {r:?} runs past the largest id"));
                }
            }
            for (i, a) in map.iter().enumerate() {
                for b in &map[i + 1..] {
                    if overlap(a.container_id, a.length, b.container_id, b.length) {
                        return Err(format!(
                            "{kind} mappings {a:?} and {b:?} overlap inside the container"
                        ));
                    }
                    if overlap(a.host_id, a.length, b.host_id, b.length) {
                        return Err(format!(
                            "{kind} mappings {a:?} and {b:?} overlap on the host"
                        ));
                    }
                }
            }
            if self.to_host(map, 0).is_none() {
                return Err(format!(
                    "{kind} mappings do not map container {kind} 0 (the container's root)"
                ));
            }
        }
        Ok(())
    }

    /// A host id range of `self` shared with `other`, described for an error.
    pub fn host_overlap(&self, other: &UserNsSpec) -> Option<String> {
        for (kind, mine, theirs) in [
            ("uid", &self.uids, &other.uids),
            ("gid", &self.gids, &other.gids),
        ] {
            for a in mine {
                for b in theirs {
                    if overlap(a.host_id, a.length, b.host_id, b.length) {
                        return Some(format!(
                            "host {kind}s {}..{} overlap {}..{}",
                            a.host_id,
                            IdRange::end(a.host_id, a.length),
                            b.host_id,
                            IdRange::end(b.host_id, b.length)
                        ));
                    }
                }
            }
        }
        None
    }

    fn to_host(&self, map: &[IdRange], id: u32) -> Option<u32> {
        map.iter().find_map(|r| {
            (id >= r.container_id && (id as u64) < IdRange::end(r.container_id, r.length))
                .then(|| r.host_id + (id - r.container_id))
        })
    }

    /// The host uid that container uid `id` is.
    pub fn host_uid(&self, id: u32) -> Option<u32> {
        self.to_host(&self.uids, id)
    }

    /// The host gid that container gid `id` is.
    pub fn host_gid(&self, id: u32) -> Option<u32> {
        self.to_host(&self.gids, id)
    }
}

fn overlap(a: u32, alen: u32, b: u32, blen: u32) -> bool {
    (a as u64) < IdRange::end(b, blen) && (b as u64) < IdRange::end(a, alen)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(container_id: u32, host_id: u32, length: u32) -> IdRange {
        IdRange {
            container_id,
            host_id,
            length,
        }
    }

    fn spec(uids: Vec<IdRange>) -> UserNsSpec {
        UserNsSpec {
            gids: uids.clone(),
            uids,
        }
    }

    #[test]
    fn kubelet_mapping_is_valid() {
        let s = spec(vec![r(0, 65536, 65536)]);
        assert_eq!(s.validate(), Ok(()));
        assert_eq!(s.host_uid(0), Some(65536));
        assert_eq!(s.host_gid(65535), Some(131071));
        assert_eq!(s.host_uid(65536), None);
    }

    #[test]
    fn malformed_mappings_are_refused() {
        for (s, why) in [
            (spec(vec![]), "no uid"),
            (spec(vec![r(0, 1000, 0)]), "length 0"),
            (spec(vec![r(1, 1000, 10)]), "container uid 0"),
            (
                spec(vec![r(0, 1000, 10), r(5, 5000, 10)]),
                "inside the container",
            ),
            (spec(vec![r(0, 1000, 10), r(10, 1005, 10)]), "on the host"),
            (spec(vec![r(0, u32::MAX - 5, 10)]), "past the largest"),
            (
                UserNsSpec {
                    uids: vec![r(0, 1000, 10)],
                    gids: vec![],
                },
                "no gid",
            ),
        ] {
            let e = s.validate().unwrap_err();
            assert!(e.contains(why), "{s:?}: {e}");
        }
    }

    #[test]
    fn host_overlap_is_found() {
        let a = spec(vec![r(0, 65536, 65536)]);
        assert!(a.host_overlap(&spec(vec![r(0, 131072, 65536)])).is_none());
        let e = a.host_overlap(&spec(vec![r(0, 131071, 10)])).unwrap();
        assert!(e.contains("65536..131072"), "{e}");
    }
}
