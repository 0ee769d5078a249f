//! One owner per StatefulSet. Two StatefulApps naming one StatefulSet would each take
//! their own operation lock and could run a restore and a backup on the same volumes at
//! once. The older of the two (by creation, then name) manages it; the younger reports
//! `AlreadyManaged`, naming the other, and no controller acts through it. A StatefulApp's
//! `statefulSetName` is immutable, so the owner changes only when the older app goes.

use kube::ResourceExt;
use stateward_api::StatefulApp;

/// The condition reason of a StatefulApp whose StatefulSet another one manages.
pub const ALREADY_MANAGED: &str = "AlreadyManaged";

/// The app among `apps` (same namespace) that manages `app`'s StatefulSet instead of it:
/// the oldest other one naming the same StatefulSet, if it is older than `app`.
pub fn managed_by_other<'a>(
    app: &StatefulApp,
    apps: impl IntoIterator<Item = &'a StatefulApp>,
) -> Option<&'a StatefulApp> {
    let key = |a: &StatefulApp| {
        (
            a.metadata.creation_timestamp.as_ref().map(|t| t.0),
            a.name_any(),
        )
    };
    apps.into_iter()
        .filter(|other| {
            other.namespace() == app.namespace()
                && other.spec.stateful_set_name == app.spec.stateful_set_name
                && other.uid() != app.uid()
        })
        .min_by_key(|other| key(other))
        .filter(|other| key(other) < key(app))
}

/// The sentence for a younger app's condition and event.
pub fn message(app: &StatefulApp, owner: &StatefulApp) -> String {
    format!(
        "StatefulSet {} is already managed by StatefulApp {} (created earlier); StatefulApp {} does nothing until that one is deleted",
        app.spec.stateful_set_name,
        owner.name_any(),
        app.name_any()
    )
}

/// Who manages `app`'s StatefulSet instead of it, from the shared StatefulApp cache (an
/// older app has been in it for longer than the younger one's operation took to start).
pub fn check(app: &StatefulApp, stores: &crate::watch::Stores) -> Option<String> {
    let apps = stores.apps.reader().state();
    managed_by_other(app, apps.iter().map(|a| a.as_ref())).map(|owner| message(app, owner))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn app(name: &str, sts: &str, created: &str) -> StatefulApp {
        serde_yaml::from_str(&format!(
            "apiVersion: stateward.io/v1alpha1\nkind: StatefulApp\nmetadata: {{name: {name}, namespace: shop, uid: u-{name}, creationTimestamp: '{created}'}}\nspec: {{statefulSetName: {sts}}}"
        ))
        .unwrap_or_else(|e| panic!("fixture: {e}"))
    }

    #[test]
    fn the_older_app_manages_and_the_younger_names_it() {
        let first = app("db", "pg", "2026-01-01T00:00:00Z");
        let second = app("db-copy", "pg", "2026-01-02T00:00:00Z");
        let same_second = app("a-db", "pg", "2026-01-02T00:00:00Z");
        let other = app("cache", "redis", "2025-01-01T00:00:00Z");
        let all = [
            first.clone(),
            second.clone(),
            same_second.clone(),
            other.clone(),
        ];
        type Row<'a> = (&'a StatefulApp, Option<&'a str>);
        let rows: [Row; 4] = [
            (&first, None),
            (&second, Some("db")),
            (&same_second, Some("db")),
            (&other, None),
        ];
        for (app, owner) in rows {
            assert_eq!(
                managed_by_other(app, &all).map(|a| a.name_any()).as_deref(),
                owner,
                "{}",
                app.name_any()
            );
        }
        // Created in the same second: the name decides, the same way for both.
        let two = [second.clone(), same_second.clone()];
        assert_eq!(
            managed_by_other(&second, &two)
                .map(|a| a.name_any())
                .as_deref(),
            Some("a-db")
        );
        assert!(managed_by_other(&same_second, &two).is_none());
        assert!(message(&second, &first).contains("StatefulApp db"));
    }
}
