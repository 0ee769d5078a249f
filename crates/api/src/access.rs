//! Who owns an app's data, and the one opt-in elevated mode: how Stateward's volume agents
//! run so they pass Pod Security `restricted` whenever the data allows it.
//!
//! A volume agent runs as the data's owner (found from the app, or set in
//! `spec.dataAccess.owner`), non-root when the owner is, with every capability dropped. A
//! backup records who owned the files it archived ([`Ownership`]), so a restore knows
//! *before it stops the app* whether one non-root owner can write the data back, or
//! whether it needs `spec.dataAccess.elevated` (root with CHOWN, FOWNER and
//! DAC_OVERRIDE; MKNOD only for device nodes).

use serde::{Deserialize, Serialize};

/// How Stateward's agents touch the app's volumes.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DataAccess {
    /// Who owns the app's data. When unset it is found before any agent runs: the app
    /// container's `runAsUser`/`runAsGroup` and the pod's `fsGroup`, else the owner of the
    /// volume's mount point as seen in the running app container (`stat`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<DataOwner>,
    /// Lets volume agents run as root with only the capabilities the data needs: a backup
    /// reads with DAC_READ_SEARCH; a restore writes with CHOWN, FOWNER and DAC_OVERRIDE
    /// (and MKNOD when the backup holds device nodes). Needed when the data has several
    /// owners, setuid/setgid files or device nodes; a restore that needs it while it is
    /// off is refused before the app is stopped. Such agents do not pass Pod Security
    /// `restricted`.
    #[serde(default)]
    pub elevated: bool,
}

/// The user and groups the data belongs to.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DataOwner {
    /// The uid that owns the files.
    #[schemars(range(min = 0, max = 2147483647))]
    pub user: i64,
    /// The primary gid of the agents (the user's own when unset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 2147483647))]
    pub group: Option<i64>,
    /// A group the volume is shared through (the app's `fsGroup`, when unset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 2147483647))]
    pub fs_group: Option<i64>,
}

/// How many distinct users or groups an [`Ownership`] lists before it says `more`.
pub const OWNERSHIP_LIST_MAX: usize = 16;

/// Who owned the files of one archived volume, as the backup agent saw them (the volume
/// root itself excluded: a restore keeps the target's root as it is).
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Ownership {
    /// The distinct owning uids, ascending (at most 16).
    #[serde(default)]
    #[schemars(length(max = 16))]
    pub users: Vec<i64>,
    /// The distinct owning gids, ascending (at most 16).
    #[serde(default)]
    #[schemars(length(max = 16))]
    pub groups: Vec<i64>,
    /// Whether there were more distinct users or groups than listed.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub more: bool,
    /// Regular files carrying a setuid or setgid bit.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub setid_files: i64,
    /// Character and block device nodes.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub device_nodes: i64,
    /// The owner of the volume's root directory (whether the files' owner can write into
    /// it: an in-place restore swaps entries there).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root_user: Option<i64>,
    /// The group of the volume's root directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root_group: Option<i64>,
    /// The uid the app's container ran as when the backup was taken. An agent may do as
    /// root what an app running as root could (restore several owners without
    /// `elevated`); for an app running as another user that needs the opt-in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_user: Option<i64>,
}

fn is_zero(n: &i64) -> bool {
    *n == 0
}

impl Ownership {
    /// Counts one archived entry.
    pub fn observe(&mut self, uid: u32, gid: u32, setid_file: bool, device: bool) {
        fn insert(list: &mut Vec<i64>, more: &mut bool, id: u32) {
            let id = i64::from(id);
            if let Err(at) = list.binary_search(&id) {
                if list.len() < OWNERSHIP_LIST_MAX {
                    list.insert(at, id);
                } else {
                    *more = true;
                }
            }
        }
        insert(&mut self.users, &mut self.more, uid);
        insert(&mut self.groups, &mut self.more, gid);
        self.setid_files += i64::from(setid_file);
        self.device_nodes += i64::from(device);
    }

    /// The one user that owns every file, when there is exactly one (an empty volume has
    /// none).
    pub fn sole_user(&self) -> Option<i64> {
        match (self.users.as_slice(), self.more) {
            ([user], false) => Some(*user),
            _ => None,
        }
    }

    /// Why writing these files back needs elevated mode, or `None` when one user can
    /// (running as that user, a member of every listed group).
    pub fn elevation_needed(&self) -> Option<String> {
        let mut why = Vec::new();
        if self.users.len() > 1 || self.more {
            let listed: Vec<String> = self.users.iter().map(|u| u.to_string()).collect();
            why.push(format!(
                "files of several owners (uids {}{})",
                listed.join(", "),
                if self.more { ", ..." } else { "" }
            ));
        }
        if self.setid_files > 0 {
            why.push(format!("{} setuid/setgid file(s)", self.setid_files));
        }
        if self.device_nodes > 0 {
            why.push(format!("{} device node(s)", self.device_nodes));
        }
        (!why.is_empty()).then(|| why.join(", "))
    }
}

/// The identity a volume agent runs as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AgentIdentity {
    pub user: i64,
    pub group: i64,
    pub fs_group: Option<i64>,
}

impl AgentIdentity {
    pub fn from_owner(owner: &DataOwner) -> Self {
        Self {
            user: owner.user,
            group: owner.group.unwrap_or(owner.user),
            fs_group: owner.fs_group,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(entries: &[(u32, u32, bool, bool)]) -> Ownership {
        let mut o = Ownership::default();
        for &(u, g, s, d) in entries {
            o.observe(u, g, s, d);
        }
        o
    }

    #[test]
    fn ownership_decides_whether_one_user_can_write_the_data_back() {
        type Row = (
            &'static str,
            Vec<(u32, u32, bool, bool)>,
            Option<i64>,
            Option<&'static str>,
        );
        let rows: Vec<Row> = vec![
            ("an empty volume", vec![], None, None),
            (
                "one owner",
                vec![(999, 999, false, false); 3],
                Some(999),
                None,
            ),
            (
                "one owner, two groups (fsGroup)",
                vec![(999, 999, false, false), (999, 2000, false, false)],
                Some(999),
                None,
            ),
            ("root alone", vec![(0, 0, false, false)], Some(0), None),
            (
                "two owners",
                vec![(999, 999, false, false), (0, 0, false, false)],
                None,
                Some("several owners (uids 0, 999)"),
            ),
            (
                "a setuid file",
                vec![(999, 999, true, false)],
                Some(999),
                Some("1 setuid/setgid file(s)"),
            ),
            (
                "a device node",
                vec![(0, 0, false, true)],
                Some(0),
                Some("1 device node(s)"),
            ),
        ];
        for (name, entries, sole, why) in rows {
            let o = seen(&entries);
            assert_eq!(o.sole_user(), sole, "{name}");
            let got = o.elevation_needed();
            match why {
                None => assert_eq!(got, None, "{name}"),
                Some(part) => assert!(
                    got.as_deref().is_some_and(|g| g.contains(part)),
                    "{name}: {got:?}"
                ),
            }
        }
    }

    #[test]
    fn ownership_lists_are_bounded_and_say_more() {
        let o = seen(
            &(0..40)
                .map(|i| (1000 + i, 1000 + i, false, false))
                .collect::<Vec<_>>(),
        );
        assert_eq!(o.users.len(), OWNERSHIP_LIST_MAX);
        assert!(o.more);
        assert_eq!(o.sole_user(), None);
        assert!(o.elevation_needed().is_some_and(|w| w.contains("...")));
        assert_eq!(o.users, (1000..1016).collect::<Vec<i64>>());
    }
}
