//! One cache fed by several watches (one per namespace): see [`Merge`].

use std::collections::{HashMap, HashSet};
use std::fmt::Debug;
use std::sync::Arc;

use kube::Resource;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::watcher::Event;

/// What one watch event did to the merged cache.
#[derive(Debug)]
pub(super) enum Merged<K> {
    /// An object was applied: the cached object.
    Changed(Arc<K>),
    /// An object was deleted: its last state.
    Deleted(Arc<K>),
    /// A watch (re-)listed: the cache may differ anywhere in that watch's namespace.
    Resynced,
    /// Nothing subscribers can see yet (the cache is not ready, or a list is under way).
    Nothing,
}

/// One cache fed by several watches, one per namespace (the API has no watch of a list
/// of namespaces). kube's store writer cannot take them as one stream: every watch's
/// `Init` would reset the whole store, dropping the other namespaces. So each watch's
/// list is buffered here and applied to its own namespace only; the store is ready once
/// every watch listed once. With one watch (one namespace, or all of them) this is what
/// kube's `reflect` does.
pub(super) struct Merge<K: Resource<DynamicType = ()> + Clone + 'static> {
    writer: reflector::store::Writer<K>,
    reader: Store<K>,
    sources: Vec<Source<K>>,
    /// Until every watch listed once: what those that did hold (the store stays empty
    /// and not ready, so no controller decides from a partial view).
    early: Option<HashMap<ObjectRef<K>, K>>,
}

struct Source<K> {
    /// The namespace watched, or all.
    namespace: Option<String>,
    /// The list under way (between `Init` and `InitDone`).
    listing: Option<Vec<K>>,
    listed: bool,
}

impl<K> Merge<K>
where
    K: Resource<DynamicType = ()> + Clone + Debug + Send + Sync + 'static,
{
    pub(super) fn new(
        writer: reflector::store::Writer<K>,
        reader: Store<K>,
        namespaces: Vec<Option<String>>,
    ) -> Self {
        Self {
            writer,
            reader,
            sources: namespaces
                .into_iter()
                .map(|namespace| Source {
                    namespace,
                    listing: None,
                    listed: false,
                })
                .collect(),
            early: Some(HashMap::new()),
        }
    }

    /// Whether watch `source` is the one that sees objects of `namespace`.
    fn owns(&self, source: usize, namespace: Option<&str>) -> bool {
        self.sources
            .get(source)
            .is_some_and(|s| s.namespace.is_none() || s.namespace.as_deref() == namespace)
    }

    pub(super) fn apply(&mut self, source: usize, event: Event<K>) -> Merged<K> {
        if source >= self.sources.len() {
            return Merged::Nothing;
        }
        match event {
            Event::Init => {
                self.sources[source].listing = Some(Vec::new());
                Merged::Nothing
            }
            Event::InitApply(object) => {
                self.sources[source]
                    .listing
                    .get_or_insert_with(Vec::new)
                    .push(object);
                Merged::Nothing
            }
            Event::InitDone => self.listed(source),
            Event::Apply(object) => match &mut self.early {
                Some(early) => {
                    early.insert(ObjectRef::from_obj(&object), object);
                    Merged::Nothing
                }
                None => {
                    let r = ObjectRef::from_obj(&object);
                    self.writer.apply_watcher_event(&Event::Apply(object));
                    match self.reader.get(&r) {
                        Some(cached) => Merged::Changed(cached),
                        None => Merged::Nothing,
                    }
                }
            },
            Event::Delete(object) => match &mut self.early {
                Some(early) => {
                    early.remove(&ObjectRef::from_obj(&object));
                    Merged::Nothing
                }
                None => {
                    // The writer takes the event by reference: the object comes back.
                    let event = Event::Delete(object);
                    self.writer.apply_watcher_event(&event);
                    let Event::Delete(object) = event else {
                        return Merged::Nothing;
                    };
                    Merged::Deleted(Arc::new(object))
                }
            },
        }
    }

    /// Watch `source` finished a list: its namespace now holds exactly that list.
    fn listed(&mut self, source: usize) -> Merged<K> {
        let listed = self.sources[source].listing.take().unwrap_or_default();
        self.sources[source].listed = true;
        if let Some(mut early) = self.early.take() {
            early.retain(|r, _| !self.owns(source, r.namespace.as_deref()));
            for object in listed {
                early.insert(ObjectRef::from_obj(&object), object);
            }
            if !self.sources.iter().all(|s| s.listed) {
                self.early = Some(early);
                return Merged::Nothing;
            }
            // Every watch listed: the store takes it all at once and becomes ready.
            self.writer.apply_watcher_event(&Event::Init);
            for (_, object) in early {
                self.writer.apply_watcher_event(&Event::InitApply(object));
            }
            self.writer.apply_watcher_event(&Event::InitDone);
            return Merged::Resynced;
        }
        // A re-list (after the watch expired): apply it to this namespace only, deleting
        // what it no longer holds.
        let present: HashSet<ObjectRef<K>> = listed.iter().map(ObjectRef::from_obj).collect();
        for cached in self.reader.state() {
            let r = ObjectRef::from_obj(cached.as_ref());
            if self.owns(source, r.namespace.as_deref()) && !present.contains(&r) {
                self.writer
                    .apply_watcher_event(&Event::Delete(cached.as_ref().clone()));
            }
        }
        for object in listed {
            self.writer.apply_watcher_event(&Event::Apply(object));
        }
        Merged::Resynced
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::ResourceExt;
    use stateward_api::StatefulApp;

    fn is_ready(store: &Store<StatefulApp>) -> bool {
        futures::FutureExt::now_or_never(store.wait_until_ready()).is_some_and(|r| r.is_ok())
    }

    fn app_in(namespace: &str, name: &str, generation: i64) -> StatefulApp {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "stateward.io/v1alpha1",
            "kind": "StatefulApp",
            "metadata": {"name": name, "namespace": namespace, "generation": generation,
                         "resourceVersion": format!("{generation}")},
            "spec": {"statefulSetName": "s"}
        }))
        .unwrap_or_else(|e| panic!("fixture: {e}"))
    }

    fn names(store: &Store<StatefulApp>) -> Vec<String> {
        let mut names: Vec<String> = store
            .state()
            .iter()
            .map(|a| format!("{}/{}", a.namespace().unwrap_or_default(), a.name_any()))
            .collect();
        names.sort();
        names
    }

    /// Two namespaces' watches into one cache: ready only once both listed, a re-list of
    /// one leaves the other's objects alone, and changes pass through after that.
    #[test]
    fn merge_keeps_each_namespace_to_its_own_watch() {
        let (reader, writer) = reflector::store::<StatefulApp>();
        let mut merge = Merge::new(
            writer,
            reader.clone(),
            vec![Some("a".to_string()), Some("b".to_string())],
        );
        let nothing = |m: Merged<StatefulApp>| matches!(m, Merged::Nothing);
        // a lists, and changes before b has listed: the cache stays empty and not ready.
        assert!(nothing(merge.apply(0, Event::Init)));
        assert!(nothing(
            merge.apply(0, Event::InitApply(app_in("a", "one", 1)))
        ));
        assert!(nothing(
            merge.apply(0, Event::InitApply(app_in("a", "two", 1)))
        ));
        assert!(nothing(merge.apply(0, Event::InitDone)));
        assert!(nothing(
            merge.apply(0, Event::Delete(app_in("a", "two", 1)))
        ));
        assert!(nothing(
            merge.apply(0, Event::Apply(app_in("a", "three", 1)))
        ));
        assert!(!is_ready(&reader));
        assert!(reader.is_empty());
        // b lists: the cache takes both at once.
        assert!(nothing(merge.apply(1, Event::Init)));
        assert!(nothing(
            merge.apply(1, Event::InitApply(app_in("b", "one", 1)))
        ));
        assert!(matches!(merge.apply(1, Event::InitDone), Merged::Resynced));
        assert!(is_ready(&reader));
        assert_eq!(names(&reader), ["a/one", "a/three", "b/one"]);
        // b re-lists without b/one and with b/new: a's objects stay.
        assert!(nothing(merge.apply(1, Event::Init)));
        assert!(nothing(
            merge.apply(1, Event::InitApply(app_in("b", "new", 1)))
        ));
        assert!(
            names(&reader).contains(&"b/one".to_string()),
            "a list under way changes nothing yet"
        );
        assert!(matches!(merge.apply(1, Event::InitDone), Merged::Resynced));
        assert_eq!(names(&reader), ["a/one", "a/three", "b/new"]);
        // Changes pass through, as the cached object.
        match merge.apply(0, Event::Apply(app_in("a", "one", 2))) {
            Merged::Changed(a) => assert_eq!(a.metadata.generation, Some(2)),
            other => panic!("{other:?}"),
        }
        match merge.apply(0, Event::Delete(app_in("a", "three", 1))) {
            Merged::Deleted(a) => assert_eq!(a.name_any(), "three"),
            other => panic!("{other:?}"),
        }
        assert_eq!(names(&reader), ["a/one", "b/new"]);
    }

    /// One cluster-wide watch: its re-list replaces everything, as kube's reflector does.
    #[test]
    fn merge_of_one_cluster_wide_watch_is_a_plain_reflector() {
        let (reader, writer) = reflector::store::<StatefulApp>();
        let mut merge = Merge::new(writer, reader.clone(), vec![None]);
        merge.apply(0, Event::Init);
        merge.apply(0, Event::InitApply(app_in("a", "one", 1)));
        merge.apply(0, Event::InitApply(app_in("b", "one", 1)));
        assert!(matches!(merge.apply(0, Event::InitDone), Merged::Resynced));
        assert_eq!(names(&reader), ["a/one", "b/one"]);
        merge.apply(0, Event::Init);
        merge.apply(0, Event::InitApply(app_in("c", "one", 1)));
        merge.apply(0, Event::InitDone);
        assert_eq!(names(&reader), ["c/one"]);
    }
}
