//! Whom a volume backup agent runs as: the data's owner, found before the agent runs.
//!
//! In order: `spec.dataAccess.elevated` (root reading past modes), `spec.dataAccess.owner`,
//! the app container's `runAsUser` (container, else pod) with its group and the pod's
//! `fsGroup`, else what the running app container sees (one short exec through the API):
//! its own uid (`id -u`: an image's `USER`, or root for an image whose entrypoint drops
//! to a user after `chown`ing its data, as the official postgres and redis images do)
//! and the owners of the volume's top-level entries (`stat`; the file system's
//! `lost+found` aside). One owner: the agent runs as that owner. Several: as root reading
//! past modes when the app itself runs as root (the agent may do what the app can),
//! else only with `spec.dataAccess.elevated`.

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use stateward_agent::job::VolumeAccess;
use stateward_api::StatefulApp;
use stateward_api::access::AgentIdentity;

/// Whom an agent runs as, and the uid the app runs as when known (recorded with the
/// backup's ownership for the restore).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resolved {
    pub access: VolumeAccess,
    pub app_user: Option<i64>,
}

/// How the identity of one volume's agent is learned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// Known from the spec alone.
    Known(Resolved),
    /// Ask the app container (see [`listing_command`]); `fs_group` is the pod's.
    Ask {
        container: String,
        path: String,
        fs_group: Option<i64>,
    },
    /// Not learnable: why, naming the field to set.
    Unknown(String),
}

/// What the spec says about the agent of `claim` (mounted by `pod`).
pub fn lookup(app: &StatefulApp, pod: &Pod, claim: &str) -> Lookup {
    let access = app.spec.data_access.clone().unwrap_or_default();
    let spec = pod.spec.clone().unwrap_or_default();
    let pod_sc = spec.security_context.clone().unwrap_or_default();
    let known = |access, app_user| Lookup::Known(Resolved { access, app_user });
    if access.elevated {
        return known(VolumeAccess::Elevated, None);
    }
    if let Some(owner) = &access.owner {
        let mut id = AgentIdentity::from_owner(owner);
        id.fs_group = id.fs_group.or(pod_sc.fs_group);
        return known(VolumeAccess::Owner(id), None);
    }
    let volume = spec.volumes.iter().flatten().find(|v| {
        v.persistent_volume_claim
            .as_ref()
            .is_some_and(|c| c.claim_name == claim)
    });
    let mounting = volume.and_then(|v| {
        spec.containers.iter().find_map(|c| {
            c.volume_mounts
                .iter()
                .flatten()
                .find(|m| m.name == v.name)
                .map(|m| (c, m.mount_path.clone()))
        })
    });
    let Some((container, path)) = mounting else {
        return Lookup::Unknown(format!(
            "no container of pod {} mounts claim {claim}, so who owns its data cannot be learned: set spec.dataAccess.owner on the app",
            pod.metadata.name.clone().unwrap_or_default()
        ));
    };
    let sc = container.security_context.clone().unwrap_or_default();
    match sc.run_as_user.or(pod_sc.run_as_user) {
        Some(user) => known(
            VolumeAccess::Owner(AgentIdentity {
                user,
                group: sc
                    .run_as_group
                    .or(pod_sc.run_as_group)
                    .or(pod_sc.fs_group)
                    .unwrap_or(user),
                fs_group: pod_sc.fs_group,
            }),
            Some(user),
        ),
        None => Lookup::Ask {
            container: container.name.clone(),
            path,
            fs_group: pod_sc.fs_group,
        },
    }
}

/// How many top-level entries the listing looks at (a volume root with more is not
/// listed in full: the first ones decide).
const LISTED_ENTRIES: usize = 1000;

/// The question for the app container: its own uid, then the owner (uid gid) of the
/// volume root, then of each top-level entry but `lost+found` and a restore's working
/// directory. POSIX sh and `stat -c` only (GNU coreutils and busybox both answer).
pub fn listing_command(path: &str) -> Vec<String> {
    let script = format!(
        r#"id -u; cd "$1" || exit 1; n=0; for f in . * .[!.]* ..?*; do case "$f" in lost+found|{workdir}) continue;; esac; [ -e "$f" ] || [ -L "$f" ] || continue; n=$((n+1)); [ "$n" -gt {max} ] && break; stat -c '%u %g' "$f" || exit 1; done"#,
        workdir = stateward_agent::archive::RESTORE_WORKDIR,
        max = LISTED_ENTRIES + 1,
    );
    vec![
        "sh".into(),
        "-c".into(),
        script,
        "stateward-owner".into(),
        path.into(),
    ]
}

/// What the app container answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listing {
    pub app_user: u32,
    pub root: (u32, u32),
    pub entries: Vec<(u32, u32)>,
}

/// The answer to [`listing_command`], or `None` when it is not that shape.
pub fn parse_listing(output: &str) -> Option<Listing> {
    let mut lines = output.lines();
    let app_user = lines.next()?.trim().parse().ok()?;
    let pair = |line: &str| {
        let mut words = line.split_whitespace();
        let ids = (words.next()?.parse().ok()?, words.next()?.parse().ok()?);
        words.next().is_none().then_some(ids)
    };
    let root = pair(lines.next()?)?;
    let entries = lines.map(pair).collect::<Option<Vec<_>>>()?;
    Some(Listing {
        app_user,
        root,
        entries,
    })
}

/// Whom the agent runs as, from the listing: the one owner of the entries (or of the
/// root, for an empty volume); several owners only as root, and only when the app runs
/// as root.
pub fn decide(listing: &Listing, fs_group: Option<i64>, path: &str) -> Result<Resolved, String> {
    let app_user = Some(i64::from(listing.app_user));
    let mut users: Vec<u32> = listing.entries.iter().map(|(u, _)| *u).collect();
    users.sort_unstable();
    users.dedup();
    let (user, group) = match users.as_slice() {
        [] => listing.root,
        [user] => listing
            .entries
            .iter()
            .copied()
            .find(|(u, _)| u == user)
            .unwrap_or(listing.root),
        several if listing.app_user == 0 => {
            tracing::debug!(?several, "data of several owners, app runs as root");
            return Ok(Resolved {
                access: VolumeAccess::Elevated,
                app_user,
            });
        }
        several => {
            return Err(format!(
                "{path} holds data of several owners (uids {}) and the app runs as uid {}: reading it all needs root; set spec.dataAccess.elevated: true on the app (or spec.dataAccess.owner when one owner should do)",
                several
                    .iter()
                    .map(|u| u.to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
                listing.app_user
            ));
        }
    };
    Ok(Resolved {
        access: VolumeAccess::Owner(AgentIdentity {
            user: i64::from(user),
            group: i64::from(group),
            fs_group,
        }),
        app_user,
    })
}

/// How long the owner question may take.
const ASK_TIMEOUT: Duration = Duration::from_secs(30);

/// Whom the agent that backs up `claim` from `pod` runs as.
pub async fn resolve(
    pods: &Api<Pod>,
    app: &StatefulApp,
    pod: &Pod,
    claim: &str,
) -> Result<Resolved, String> {
    match lookup(app, pod, claim) {
        Lookup::Known(resolved) => Ok(resolved),
        Lookup::Unknown(why) => Err(why),
        Lookup::Ask {
            container,
            path,
            fs_group,
        } => {
            let pod_name = pod.metadata.name.clone().unwrap_or_default();
            let out = stateward_runtime::hooks::output(
                pods,
                &pod_name,
                &container,
                listing_command(&path),
                ASK_TIMEOUT,
            )
            .await
            .map_err(|e| {
                format!(
                    "learning who owns {path} in container {container}: {e}; set spec.dataAccess.owner on the app"
                )
            })?;
            let listing = parse_listing(&out).ok_or_else(|| {
                format!(
                    "learning who owns {path} in container {container}: the answer was not ids ({:?}); set spec.dataAccess.owner on the app",
                    out.chars().take(80).collect::<String>()
                )
            })?;
            decide(&listing, fs_group, &path)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn yaml<T: serde::de::DeserializeOwned>(text: &str) -> T {
        serde_yaml::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"))
    }

    fn pod(security: &str) -> Pod {
        yaml(&format!(
            r#"
metadata: {{ name: db-0 }}
spec:
  {security}
  containers:
  - name: sidecar
    image: x
  - name: main
    image: postgres
    volumeMounts: [{{ name: data, mountPath: /var/lib/postgresql/data }}]
  volumes:
  - name: data
    persistentVolumeClaim: {{ claimName: data-db-0 }}
"#
        ))
    }

    fn app(access: &str) -> StatefulApp {
        yaml(&format!(
            "metadata: {{ name: db }}\nspec:\n  statefulSetName: db\n  {access}\n"
        ))
    }

    fn owner(user: i64, group: i64, fs_group: Option<i64>) -> Lookup {
        Lookup::Known(Resolved {
            access: VolumeAccess::Owner(AgentIdentity {
                user,
                group,
                fs_group,
            }),
            app_user: Some(user),
        })
    }

    fn overridden(user: i64, group: i64, fs_group: Option<i64>) -> Lookup {
        match owner(user, group, fs_group) {
            Lookup::Known(r) => Lookup::Known(Resolved {
                app_user: None,
                ..r
            }),
            other => other,
        }
    }

    #[test]
    fn the_owner_comes_from_the_spec_else_the_security_context_else_a_stat() {
        let stat = |fs_group| Lookup::Ask {
            container: "main".into(),
            path: "/var/lib/postgresql/data".into(),
            fs_group,
        };
        let rows: Vec<(&str, StatefulApp, Pod, &str, Lookup)> = vec![
            (
                "elevated wins",
                app("dataAccess: { elevated: true, owner: { user: 5 } }"),
                pod(""),
                "data-db-0",
                Lookup::Known(Resolved {
                    access: VolumeAccess::Elevated,
                    app_user: None,
                }),
            ),
            (
                "the override, with the pod's fsGroup",
                app("dataAccess: { owner: { user: 70 } }"),
                pod("securityContext: { fsGroup: 80 }"),
                "data-db-0",
                overridden(70, 70, Some(80)),
            ),
            (
                "the override's own groups",
                app("dataAccess: { owner: { user: 70, group: 71, fsGroup: 72 } }"),
                pod("securityContext: { fsGroup: 80 }"),
                "data-db-0",
                overridden(70, 71, Some(72)),
            ),
            (
                "the pod's runAsUser and fsGroup",
                app(""),
                pod("securityContext: { runAsUser: 999, fsGroup: 999 }"),
                "data-db-0",
                owner(999, 999, Some(999)),
            ),
            (
                "runAsGroup beats fsGroup as the primary group",
                app(""),
                pod("securityContext: { runAsUser: 999, runAsGroup: 5, fsGroup: 6 }"),
                "data-db-0",
                owner(999, 5, Some(6)),
            ),
            (
                "no security context: ask the mounting container",
                app(""),
                pod(""),
                "data-db-0",
                stat(None),
            ),
            (
                "only fsGroup: ask, and keep the fsGroup",
                app(""),
                pod("securityContext: { fsGroup: 7 }"),
                "data-db-0",
                stat(Some(7)),
            ),
        ];
        for (case, app, pod, claim, expected) in rows {
            assert_eq!(lookup(&app, &pod, claim), expected, "{case}");
        }
        let container_wins: Pod = yaml(
            r#"
metadata: { name: db-0 }
spec:
  securityContext: { runAsUser: 1, runAsGroup: 1 }
  containers:
  - name: main
    image: x
    securityContext: { runAsUser: 2, runAsGroup: 3 }
    volumeMounts: [{ name: data, mountPath: /data }]
  volumes: [{ name: data, persistentVolumeClaim: { claimName: data-db-0 } }]
"#,
        );
        assert_eq!(
            lookup(&app(""), &container_wins, "data-db-0"),
            owner(2, 3, None)
        );
        match lookup(&app(""), &pod(""), "other-claim") {
            Lookup::Unknown(why) => assert!(why.contains("spec.dataAccess.owner"), "{why}"),
            other => panic!("an unmounted claim: {other:?}"),
        }
    }

    #[test]
    fn the_listing_is_ids_line_by_line_or_nothing() {
        assert_eq!(
            parse_listing("0\n0 0\n999 999\n999 2000\n"),
            Some(Listing {
                app_user: 0,
                root: (0, 0),
                entries: vec![(999, 999), (999, 2000)],
            })
        );
        assert_eq!(
            parse_listing("999\n999 999\n"),
            Some(Listing {
                app_user: 999,
                root: (999, 999),
                entries: vec![],
            })
        );
        for bad in [
            "",
            "0",
            "0\n0",
            "x\n0 0",
            "0\n0 0\n1",
            "0\n0 0\nroot root",
            "0\n0 0 0",
        ] {
            assert_eq!(parse_listing(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn the_listing_decides_the_owner_or_refuses_several_unless_the_app_is_root() {
        let listing = |app_user, root, entries: &[(u32, u32)]| Listing {
            app_user,
            root,
            entries: entries.to_vec(),
        };
        let as_owner = |user, group, fs_group, app_user| {
            Ok(Resolved {
                access: VolumeAccess::Owner(AgentIdentity {
                    user,
                    group,
                    fs_group,
                }),
                app_user: Some(app_user),
            })
        };
        type Row = (
            &'static str,
            Listing,
            Option<i64>,
            Result<Resolved, &'static str>,
        );
        let rows: Vec<Row> = vec![
            (
                "postgres without a security context: root app, root-owned mount, data of 999",
                listing(0, (0, 0), &[(999, 999)]),
                None,
                as_owner(999, 999, None, 0),
            ),
            (
                "redis run as root: everything root's",
                listing(0, (0, 0), &[(0, 0), (0, 0)]),
                None,
                as_owner(0, 0, None, 0),
            ),
            (
                "an image USER writing its own volume",
                listing(1001, (1001, 0), &[(1001, 0)]),
                Some(0),
                as_owner(1001, 0, Some(0), 1001),
            ),
            (
                "an empty volume: its root's owner",
                listing(0, (5, 6), &[]),
                None,
                as_owner(5, 6, None, 0),
            ),
            (
                "several owners, the app runs as root: root reading past modes",
                listing(0, (0, 0), &[(0, 0), (999, 999)]),
                None,
                Ok(Resolved {
                    access: VolumeAccess::Elevated,
                    app_user: Some(0),
                }),
            ),
            (
                "several owners, the app is not root",
                listing(1000, (0, 0), &[(0, 0), (1000, 1000)]),
                None,
                Err("spec.dataAccess.elevated"),
            ),
        ];
        for (case, listing, fs_group, expected) in rows {
            match (decide(&listing, fs_group, "/data"), expected) {
                (Ok(got), Ok(expected)) => assert_eq!(got, expected, "{case}"),
                (Err(why), Err(words)) => assert!(why.contains(words), "{case}: {why}"),
                (got, expected) => panic!("{case}: {got:?}, expected {expected:?}"),
            }
        }
    }

    /// The question itself, asked of this machine's sh and stat in a scratch volume.
    #[test]
    fn the_listing_command_answers_on_a_real_directory() {
        let dir = std::env::temp_dir().join(format!("stateward-listing-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for sub in ["lost+found", ".hidden", "data", ".stateward-restore"] {
            std::fs::create_dir_all(dir.join(sub)).ok();
        }
        let command = listing_command(&dir.to_string_lossy());
        let out = std::process::Command::new(&command[0])
            .args(&command[1..])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        let listing = parse_listing(&out).unwrap_or_else(|| panic!("{out:?}"));
        let me = std::process::Command::new("id")
            .arg("-u")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default();
        assert_eq!(listing.app_user.to_string(), me);
        assert_eq!(
            listing.entries.len(),
            2,
            "data and .hidden, not lost+found or the workdir: {out:?}"
        );
        std::fs::remove_dir_all(&dir).ok();
    }
}
