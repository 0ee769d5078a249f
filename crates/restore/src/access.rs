//! Whom a volume restore's agents run as, decided from the manifest before the app is
//! stopped (pure; one table test per rule).
//!
//! - A volume archive is written back by its one owner (the manifest's [`Ownership`]),
//!   non-root when that owner is, with every capability dropped — when that owner can
//!   write the volume root: root itself, through an fsGroup, or (in place) as the
//!   root's recorded owner. Its groups must be the owner's primary group and the app's
//!   fsGroup: the agent is a member of both.
//! - Otherwise (several owners or groups, setuid/setgid files, device nodes, a volume
//!   root the owner cannot write, a backup that predates ownership records) the agent
//!   runs as root with CHOWN, FOWNER and DAC_OVERRIDE (FSETID, MKNOD when needed): when
//!   the app itself runs as root (it holds those already), or with
//!   `spec.dataAccess.elevated`; else the restore is refused with the reason.
//! - A dump placed as a file, and an empty volume, are written as the app runs
//!   (`spec.dataAccess.owner`, else the StatefulSet template's user, else root with no
//!   capability).

use serde_json::Value;
use stateward_agent::job::{VolumeAccess, VolumeWork};
use stateward_agent::manifest::Entry;
use stateward_api::access::{AgentIdentity, DataAccess, Ownership};

use crate::plan::Refusal;

/// The refusal reason when the data needs elevated mode and the app does not allow it.
pub const ELEVATED_REQUIRED: &str = "ElevatedModeRequired";

/// The user, group and fsGroup a StatefulSet's pod template runs its app as.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TemplateIdentity {
    pub user: Option<i64>,
    pub group: Option<i64>,
    pub fs_group: Option<i64>,
}

impl TemplateIdentity {
    /// From a StatefulSet as JSON (live, or as the manifest recorded it): the pod's
    /// security context, with the first container's `runAsUser`/`runAsGroup` over it.
    pub fn of_stateful_set(sts: &Value) -> Self {
        let pod = sts.pointer("/spec/template/spec/securityContext");
        let container = sts.pointer("/spec/template/spec/containers/0/securityContext");
        let field =
            |v: Option<&Value>, name: &str| v.and_then(|v| v.get(name)).and_then(Value::as_i64);
        Self {
            user: field(container, "runAsUser").or(field(pod, "runAsUser")),
            group: field(container, "runAsGroup").or(field(pod, "runAsGroup")),
            fs_group: field(pod, "fsGroup"),
        }
    }
}

/// How the agents of one volume item run.
pub fn volume_access(
    entry: &Entry,
    as_file: bool,
    access: &DataAccess,
    template: TemplateIdentity,
    clone: bool,
) -> Result<(VolumeAccess, VolumeWork), Refusal> {
    let ownership = entry.ownership.as_ref();
    // Unknown ownership: the setgid bits a file may carry are kept (FSETID), device
    // nodes are refused (no MKNOD without knowing there are some).
    let special = VolumeWork::Restore {
        devices: ownership.is_some_and(|o| o.device_nodes > 0),
        setid: ownership.is_none_or(|o| o.setid_files > 0),
    };
    // The app runs as root: its template says so, or (no user in the template) its
    // container did when the backup was taken.
    let app_is_root = match template.user {
        Some(user) => user == 0,
        None => ownership.and_then(|o| o.app_user) == Some(0),
    };
    let elevate = |why: String| {
        if access.elevated || app_is_root {
            Ok((VolumeAccess::Elevated, special))
        } else {
            Err(elevated_required(&entry.name, &why))
        }
    };
    if access.elevated {
        return Ok((VolumeAccess::Elevated, special));
    }
    let fs_group = access
        .owner
        .as_ref()
        .and_then(|o| o.fs_group)
        .or(template.fs_group);
    // As the app runs: the override, else the template's user, else root (no capability).
    let as_app = || match &access.owner {
        Some(owner) => AgentIdentity {
            fs_group,
            ..AgentIdentity::from_owner(owner)
        },
        None => {
            let user = template.user.unwrap_or(0);
            AgentIdentity {
                user,
                group: template.group.or(template.fs_group).unwrap_or(user),
                fs_group,
            }
        }
    };
    let identity = if as_file {
        as_app()
    } else {
        let Some(ownership) = ownership else {
            return elevate("the backup predates the record of who owns its files".into());
        };
        if let Some(why) = ownership.elevation_needed() {
            return elevate(why);
        }
        match ownership.sole_user() {
            None => as_app(), // an empty volume
            Some(user) => match primary_group(ownership, fs_group) {
                Ok(group) => AgentIdentity {
                    user,
                    group: group.unwrap_or(user),
                    fs_group,
                },
                Err(why) => return elevate(why),
            },
        }
    };
    // The swap renames entries at the volume root (in place: the app's root; a clone's
    // is new and root's): the agent must be able to write there.
    let root_writable = identity.user == 0
        || identity.fs_group.is_some()
        || (!clone && ownership.and_then(|o| o.root_user) == Some(identity.user));
    if !root_writable {
        return elevate(format!(
            "the files belong to uid {} but the volume root does not ({}), and no fsGroup lets that user write it (set fsGroup in the StatefulSet's pod template or spec.dataAccess.owner.fsGroup)",
            identity.user,
            if clone {
                "a clone's new volume belongs to root"
            } else {
                "it belongs to another user"
            }
        ));
    }
    Ok((
        VolumeAccess::Owner(identity),
        VolumeWork::Restore {
            devices: false,
            setid: false,
        },
    ))
}

/// The agent's primary group for data whose files belong to `ownership`'s groups: every
/// group must be it or the fsGroup (`None`: no file at all).
fn primary_group(ownership: &Ownership, fs_group: Option<i64>) -> Result<Option<i64>, String> {
    let others: Vec<i64> = ownership
        .groups
        .iter()
        .copied()
        .filter(|g| Some(*g) != fs_group)
        .collect();
    match others.as_slice() {
        [] => Ok(fs_group.filter(|_| !ownership.groups.is_empty())),
        [one] => Ok(Some(*one)),
        several => Err(format!(
            "files of several groups (gids {}) that are not the app's fsGroup",
            several
                .iter()
                .map(|g| g.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

fn elevated_required(volume: &str, why: &str) -> Refusal {
    Refusal {
        reason: ELEVATED_REQUIRED,
        message: format!(
            "volume {volume}: {why}; the app does not run as root, and writing that back needs root with CHOWN, FOWNER and DAC_OVERRIDE: set spec.dataAccess.elevated: true on the app to allow it (nothing was stopped or changed)"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn entry(ownership: Option<Ownership>) -> Entry {
        Entry {
            name: "data-db-0".into(),
            pod: "db-0".into(),
            key: "k".into(),
            encoding: "tar+zstd".into(),
            bytes_read: 1,
            bytes_stored: 1,
            sha256: String::new(),
            content_sha256: None,
            segments: 1,
            files: Some(1),
            command: vec![],
            ownership,
        }
    }

    /// Files of `users`/`groups`, the volume root owned by the one user (else root), the
    /// app recorded as running as uid 1 (not root).
    fn owned(users: &[i64], groups: &[i64], setid: i64, devices: i64) -> Option<Ownership> {
        Some(Ownership {
            users: users.to_vec(),
            groups: groups.to_vec(),
            more: false,
            setid_files: setid,
            device_nodes: devices,
            root_user: Some(if users.len() == 1 { users[0] } else { 0 }),
            root_group: Some(0),
            app_user: Some(1),
        })
    }

    fn with(o: Option<Ownership>, edit: impl FnOnce(&mut Ownership)) -> Option<Ownership> {
        o.map(|mut o| {
            edit(&mut o);
            o
        })
    }

    fn owner(
        user: i64,
        group: i64,
        fs_group: Option<i64>,
    ) -> Result<(VolumeAccess, VolumeWork), &'static str> {
        Ok((
            VolumeAccess::Owner(AgentIdentity {
                user,
                group,
                fs_group,
            }),
            VolumeWork::Restore {
                devices: false,
                setid: false,
            },
        ))
    }

    fn elevated(devices: bool, setid: bool) -> Result<(VolumeAccess, VolumeWork), &'static str> {
        Ok((
            VolumeAccess::Elevated,
            VolumeWork::Restore { devices, setid },
        ))
    }

    #[test]
    fn the_restore_runs_as_the_one_owner_or_is_refused_before_anything_stops() {
        let allow = DataAccess {
            elevated: true,
            ..Default::default()
        };
        let deny = DataAccess::default();
        let overridden = DataAccess {
            owner: Some(stateward_api::access::DataOwner {
                user: 70,
                group: None,
                fs_group: Some(71),
            }),
            elevated: false,
        };
        let none = TemplateIdentity::default();
        let fs999 = TemplateIdentity {
            user: Some(999),
            group: None,
            fs_group: Some(999),
        };
        // (case, ownership, as file, access, template, clone, expected: the access or the reason)
        type Row = (
            &'static str,
            Option<Ownership>,
            bool,
            DataAccess,
            TemplateIdentity,
            bool,
            Result<(VolumeAccess, VolumeWork), &'static str>,
        );
        let rows: Vec<Row> = vec![
            (
                "one non-root owner, in place",
                owned(&[999], &[999], 0, 0),
                false,
                deny.clone(),
                none,
                false,
                owner(999, 999, None),
            ),
            (
                "one owner with the fsGroup as a second group",
                owned(&[999], &[999, 2000], 0, 0),
                false,
                deny.clone(),
                TemplateIdentity {
                    fs_group: Some(2000),
                    ..none
                },
                false,
                owner(999, 999, Some(2000)),
            ),
            (
                "files only of the fsGroup",
                owned(&[999], &[2000], 0, 0),
                false,
                deny.clone(),
                TemplateIdentity {
                    fs_group: Some(2000),
                    ..none
                },
                false,
                owner(999, 2000, Some(2000)),
            ),
            (
                "two groups, neither the fsGroup",
                owned(&[999], &[1, 2], 0, 0),
                false,
                deny.clone(),
                none,
                false,
                Err(ELEVATED_REQUIRED),
            ),
            (
                "root's data: root, no capability",
                owned(&[0], &[0], 0, 0),
                false,
                deny.clone(),
                none,
                false,
                owner(0, 0, None),
            ),
            (
                "two owners",
                owned(&[0, 999], &[999], 0, 0),
                false,
                deny.clone(),
                none,
                false,
                Err(ELEVATED_REQUIRED),
            ),
            (
                "two owners, elevated",
                owned(&[0, 999], &[999], 0, 0),
                false,
                allow.clone(),
                none,
                false,
                elevated(false, false),
            ),
            (
                "a setuid file",
                owned(&[999], &[999], 1, 0),
                false,
                deny.clone(),
                none,
                false,
                Err(ELEVATED_REQUIRED),
            ),
            (
                "a setuid file, elevated: FSETID",
                owned(&[999], &[999], 1, 0),
                false,
                allow.clone(),
                none,
                false,
                elevated(false, true),
            ),
            (
                "device nodes, elevated: MKNOD",
                owned(&[0], &[0], 0, 2),
                false,
                allow.clone(),
                none,
                false,
                elevated(true, false),
            ),
            (
                "an old backup without ownership",
                None,
                false,
                deny.clone(),
                none,
                false,
                Err(ELEVATED_REQUIRED),
            ),
            (
                "an old backup, elevated",
                None,
                false,
                allow.clone(),
                none,
                false,
                elevated(false, true),
            ),
            (
                "an empty volume: as the app runs",
                owned(&[], &[], 0, 0),
                false,
                deny.clone(),
                fs999,
                false,
                owner(999, 999, Some(999)),
            ),
            (
                "a dump as a file: as the app runs",
                None,
                true,
                deny.clone(),
                fs999,
                false,
                owner(999, 999, Some(999)),
            ),
            (
                "a dump as a file, the app as root",
                None,
                true,
                deny.clone(),
                none,
                false,
                owner(0, 0, None),
            ),
            (
                "a dump as a file, the override",
                None,
                true,
                overridden.clone(),
                fs999,
                false,
                owner(70, 70, Some(71)),
            ),
            (
                "a clone with an fsGroup",
                owned(&[999], &[999], 0, 0),
                false,
                deny.clone(),
                fs999,
                true,
                owner(999, 999, Some(999)),
            ),
            (
                "a clone without an fsGroup",
                owned(&[999], &[999], 0, 0),
                false,
                deny.clone(),
                none,
                true,
                Err(ELEVATED_REQUIRED),
            ),
            (
                "a clone of root's data needs none",
                owned(&[0], &[0], 0, 0),
                false,
                deny.clone(),
                none,
                true,
                owner(0, 0, None),
            ),
            (
                "postgres without a security context: data of 999 under a root-owned root, the app root",
                with(owned(&[999], &[999], 0, 0), |o| {
                    o.root_user = Some(0);
                    o.app_user = Some(0)
                }),
                false,
                deny.clone(),
                none,
                false,
                elevated(false, false),
            ),
            (
                "the same, the app not root",
                with(owned(&[999], &[999], 0, 0), |o| o.root_user = Some(0)),
                false,
                deny.clone(),
                none,
                false,
                Err(ELEVATED_REQUIRED),
            ),
            (
                "the same with an fsGroup: the owner writes through it",
                with(owned(&[999], &[999], 0, 0), |o| o.root_user = Some(0)),
                false,
                deny.clone(),
                TemplateIdentity {
                    fs_group: Some(999),
                    ..none
                },
                false,
                owner(999, 999, Some(999)),
            ),
            (
                "two owners, the app runs as root (template)",
                owned(&[0, 999], &[999], 0, 0),
                false,
                deny.clone(),
                TemplateIdentity {
                    user: Some(0),
                    ..none
                },
                false,
                elevated(false, false),
            ),
            (
                "two owners, the template says 999 though the backup saw root",
                with(owned(&[0, 999], &[999], 0, 0), |o| o.app_user = Some(0)),
                false,
                deny.clone(),
                TemplateIdentity {
                    user: Some(999),
                    ..none
                },
                false,
                Err(ELEVATED_REQUIRED),
            ),
        ];
        for (case, ownership, as_file, access, template, clone, expected) in rows {
            let got = volume_access(&entry(ownership), as_file, &access, template, clone);
            match (got, expected) {
                (Ok(got), Ok(expected)) => assert_eq!(got, expected, "{case}"),
                (Err(refusal), Err(reason)) => {
                    assert_eq!(refusal.reason, reason, "{case}");
                    assert!(
                        refusal.message.contains("spec.dataAccess.elevated"),
                        "{case}: {}",
                        refusal.message
                    );
                }
                (got, expected) => panic!("{case}: got {got:?}, expected {expected:?}"),
            }
        }
    }

    #[test]
    fn the_template_identity_reads_the_pod_then_the_first_container() {
        let sts = json!({"spec": {"template": {"spec": {
            "securityContext": {"runAsUser": 1, "runAsGroup": 2, "fsGroup": 3},
            "containers": [{"name": "a", "securityContext": {"runAsUser": 10}}],
        }}}});
        assert_eq!(
            TemplateIdentity::of_stateful_set(&sts),
            TemplateIdentity {
                user: Some(10),
                group: Some(2),
                fs_group: Some(3)
            }
        );
        assert_eq!(
            TemplateIdentity::of_stateful_set(&json!({})),
            TemplateIdentity::default()
        );
    }
}
