//! The event recorder on a real API server (which validates events/v1 series): repeats of
//! one fact fold into one Event's series; another note on the same object is its own.

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::api::events::v1::Event;
use kube::api::{ListParams, PostParams};
use kube::runtime::events::{EventType, Reporter};
use kube::{Api, Resource, ResourceExt};
use stateward_runtime::events::Recorder;
use stateward_testkit::harness::{Cluster, from_yaml};

#[tokio::test]
async fn repeats_of_one_fact_fold_into_a_series_and_other_notes_stay_apart() -> Result<()> {
    let cluster = Cluster::connect().await?;
    let ns = cluster.namespace("events").await?;
    let maps: Api<ConfigMap> = cluster.api(&ns.name);
    let object = maps
        .create(
            &PostParams::default(),
            &from_yaml("metadata: { name: subject }")?,
        )
        .await?;
    let regarding = object.object_ref(&());
    let recorder = Recorder::new(
        cluster.client.clone(),
        Reporter {
            controller: "stateward-test".into(),
            instance: None,
        },
    );
    let publish = |note: &'static str| {
        recorder.publish(
            &regarding,
            EventType::Warning,
            "HookFailed",
            "RunHook",
            note,
        )
    };
    publish("the hook failed in pod db-3").await?;
    publish("the hook failed in pod db-3").await?;
    publish("the hook failed in pod db-2").await?;
    publish("the hook failed in pod db-3").await?;

    let events: Api<Event> = cluster.api(&ns.name);
    let mut found = events.list(&ListParams::default()).await?.items;
    found.sort_by_key(|e| e.note.clone());
    let summary: Vec<(String, i32)> = found
        .iter()
        .map(|e| {
            (
                e.note.clone().unwrap_or_default(),
                e.series.as_ref().map_or(1, |s| s.count),
            )
        })
        .collect();
    ensure!(
        summary
            == vec![
                ("the hook failed in pod db-2".to_string(), 1),
                ("the hook failed in pod db-3".to_string(), 3),
            ],
        "events: {summary:?}"
    );
    let series = found[1].series.as_ref().context("no series")?;
    let first = found[1].event_time.as_ref().context("no eventTime")?;
    ensure!(
        series.last_observed_time.0 >= first.0,
        "the series was last observed before it began"
    );
    ensure!(
        found
            .iter()
            .all(|e| e.regarding.as_ref().and_then(|r| r.uid.clone()) == object.uid()),
        "an event regards another object"
    );
    ns.cleanup().await
}
