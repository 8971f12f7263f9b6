//! The container user: CRI run_as_* or the image's USER, resolved through
//! the image's /etc/passwd and /etc/group, plus supplementary groups.

use super::ContainerSpec;

/// Who the container process runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups: the primary gid first (as containerd reports
    /// it), then the image's memberships (unless the policy is Strict), then
    /// the CRI supplemental_groups; no duplicates.
    pub groups: Vec<u32>,
}

struct Passwd<'a> {
    name: &'a str,
    uid: u32,
    gid: u32,
}

fn passwd_entries(text: &str) -> impl Iterator<Item = Passwd<'_>> {
    text.lines().filter_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() >= 4).then_some(())?;
        Some(Passwd {
            name: f[0],
            uid: f[2].parse().ok()?,
            gid: f[3].parse().ok()?,
        })
    })
}

struct Group<'a> {
    name: &'a str,
    gid: u32,
    members: Vec<&'a str>,
}

fn group_entries(text: &str) -> impl Iterator<Item = Group<'_>> {
    text.lines().filter_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() >= 3).then_some(())?;
        Some(Group {
            name: f[0],
            gid: f[2].parse().ok()?,
            members: f
                .get(3)
                .map(|m| m.split(',').filter(|s| !s.is_empty()).collect())
                .unwrap_or_default(),
        })
    })
}

fn id_of(what: &str, v: i64) -> Result<u32, String> {
    u32::try_from(v)
        .ok()
        .filter(|v| *v != u32::MAX)
        .ok_or_else(|| format!("{what} {v} is out of range"))
}

/// Resolves the user. `passwd` / `group` are the image's files ("" when
/// the image has none); `image_user` is the image config's USER.
pub fn resolve(
    spec: &ContainerSpec,
    image_user: &str,
    passwd: &str,
    group: &str,
) -> Result<User, String> {
    let by_name = |name: &str| passwd_entries(passwd).find(|p| p.name == name);
    let by_uid = |uid: u32| passwd_entries(passwd).find(|p| p.uid == uid);
    let sec = &spec.security;
    // (uid, primary gid, user name for /etc/group memberships)
    let (uid, mut gid, name): (u32, u32, Option<String>) = if let Some(u) = spec.run_as_user {
        let uid = id_of("run_as_user", u)?;
        let p = by_uid(uid);
        (
            uid,
            p.as_ref().map(|p| p.gid).unwrap_or(0),
            p.map(|p| p.name.to_string()),
        )
    } else if !spec.run_as_username.is_empty() {
        let p = by_name(&spec.run_as_username).ok_or_else(|| {
            format!(
                "user {:?} (run_as_username) not found in the image's /etc/passwd",
                spec.run_as_username
            )
        })?;
        (p.uid, p.gid, Some(p.name.to_string()))
    } else if !image_user.is_empty() {
        let (user, grp) = match image_user.split_once(':') {
            Some((u, g)) => (u, Some(g)),
            None => (image_user, None),
        };
        let (uid, gid, name) = match user.parse::<u32>() {
            Ok(uid) => {
                let p = by_uid(uid);
                (
                    uid,
                    p.as_ref().map(|p| p.gid).unwrap_or(0),
                    p.map(|p| p.name.to_string()),
                )
            }
            Err(_) => {
                let p = by_name(user).ok_or_else(|| {
                    format!("image user {user:?} not found in the image's /etc/passwd")
                })?;
                (p.uid, p.gid, Some(p.name.to_string()))
            }
        };
        let gid = match grp {
            None | Some("") => gid,
            Some(g) => match g.parse::<u32>() {
                Ok(g) => g,
                Err(_) => group_entries(group)
                    .find(|e| e.name == g)
                    .map(|e| e.gid)
                    .ok_or_else(|| {
                        format!("image group {g:?} not found in the image's /etc/group")
                    })?,
            },
        };
        (uid, gid, name)
    } else {
        (
            0,
            0,
            Some("root".to_string()).filter(|_| by_uid(0).is_some()),
        )
    };
    if let Some(g) = spec.run_as_group {
        if spec.run_as_user.is_none() && spec.run_as_username.is_empty() {
            return Err("run_as_group needs run_as_user or run_as_username".into());
        }
        gid = id_of("run_as_group", g)?;
    }
    let mut groups = vec![gid];
    if !sec.strict_groups {
        if let Some(name) = &name {
            for g in group_entries(group) {
                if g.name != name && g.members.contains(&name.as_str()) {
                    groups.push(g.gid);
                }
            }
        }
    }
    for g in &sec.supplemental_groups {
        groups.push(id_of("supplemental group", *g)?);
    }
    let mut seen = std::collections::BTreeSet::new();
    groups.retain(|g| seen.insert(*g));
    Ok(User { uid, gid, groups })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0::/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n";
    const GROUP: &str = "root:x:0:\napp:x:1000:\nextra:x:2000:app\nother:x:3000:root,app\n";

    fn spec() -> ContainerSpec {
        ContainerSpec::default()
    }

    #[test]
    fn image_user_name_and_group_name() {
        let u = resolve(&spec(), "app:extra", PASSWD, GROUP).unwrap();
        assert_eq!((u.uid, u.gid), (1000, 2000));
        assert_eq!(u.groups, [2000, 3000]);
        let u = resolve(&spec(), "1000:1000", PASSWD, GROUP).unwrap();
        assert_eq!(u.groups, [1000, 2000, 3000]);
        assert!(resolve(&spec(), "app:nope", PASSWD, GROUP)
            .unwrap_err()
            .contains("nope"));
    }

    #[test]
    fn strict_policy_ignores_image_groups() {
        let mut s = spec();
        s.run_as_user = Some(1000);
        s.security.supplemental_groups = vec![5000];
        assert_eq!(
            resolve(&s, "", PASSWD, GROUP).unwrap().groups,
            [1000, 2000, 3000, 5000]
        );
        s.security.strict_groups = true;
        assert_eq!(resolve(&s, "", PASSWD, GROUP).unwrap().groups, [1000, 5000]);
    }

    #[test]
    fn run_as_group_needs_a_user() {
        let mut s = spec();
        s.run_as_group = Some(5);
        assert!(resolve(&s, "app", PASSWD, GROUP).is_err());
        s.run_as_username = "app".into();
        assert_eq!(resolve(&s, "", PASSWD, GROUP).unwrap().gid, 5);
        s.run_as_username = "ghost".into();
        assert!(resolve(&s, "", PASSWD, GROUP)
            .unwrap_err()
            .contains("ghost"));
    }
}
