//! Admission on a real API server: for every rule the CRDs carry, at least two invalid
//! objects are refused with a message naming the field, and a valid neighbour (the same
//! object with the field set right) is admitted. Everything is a server-side dry run,
//! except the transition rules, which need a stored object to compare with. The rules
//! and where each is enforced are listed in `docs/validation.md`.

use anyhow::{Context, Result, bail, ensure};
use kube::api::{ApiResource, DynamicObject, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use stateward_testkit::harness::{Cluster, TestNamespace, install_crds};

async fn setup(test: &str) -> Result<(Cluster, TestNamespace)> {
    let cluster = Cluster::connect().await?;
    {
        let _serial = cluster.serial().await?;
        install_crds(&cluster.client, &stateward_api::crds()).await?;
    }
    let ns = cluster.namespace(test).await?;
    Ok((cluster, ns))
}

fn resource(kind: &str) -> ApiResource {
    let plural = match kind {
        "BackupRepository" => "backuprepositories".to_string(),
        other => format!("{}s", other.to_lowercase()),
    };
    ApiResource {
        group: "stateward.io".into(),
        version: "v1alpha1".into(),
        api_version: "stateward.io/v1alpha1".into(),
        kind: kind.into(),
        plural,
    }
}

fn api(client: &Client, namespace: &str, kind: &str) -> Api<DynamicObject> {
    Api::namespaced_with(client.clone(), namespace, &resource(kind))
}

fn parse(yaml: &str) -> Result<DynamicObject> {
    serde_yaml::from_str(yaml).with_context(|| format!("test object is not YAML: {yaml}"))
}

/// Creates `yaml` as a server-side dry run (`dry_run`) or for real.
async fn create(client: &Client, namespace: &str, yaml: &str, dry_run: bool) -> Result<Outcome> {
    let object = parse(yaml)?;
    let kind = object.types.clone().unwrap_or_default().kind;
    let params = PostParams {
        dry_run,
        ..Default::default()
    };
    Ok(Outcome::of(
        api(client, namespace, &kind).create(&params, &object).await,
    ))
}

/// What the API server said.
enum Outcome {
    Admitted,
    Refused(String),
    Other(String),
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Admitted => write!(f, "admitted"),
            Self::Refused(m) => write!(f, "refused: {m}"),
            Self::Other(e) => write!(f, "an unexpected error: {e}"),
        }
    }
}

impl Outcome {
    fn of<T>(result: Result<T, kube::Error>) -> Self {
        match result {
            Ok(_) => Self::Admitted,
            Err(kube::Error::Api(s)) if s.code == 422 => Self::Refused(s.message),
            Err(e) => Self::Other(e.to_string()),
        }
    }
}

const CREDS: &str =
    "credentials: { accessKeyId: { name: s, key: a }, secretAccessKey: { name: s, key: b } }";

fn app(spec: &str) -> String {
    format!(
        "apiVersion: stateward.io/v1alpha1\nkind: StatefulApp\nmetadata: {{ name: a }}\nspec: {spec}\n"
    )
}

/// A StatefulApp whose spec is `statefulSetName: db` plus `rest`.
fn app_with(rest: &str) -> String {
    app(&format!("{{ statefulSetName: db, {rest} }}"))
}

fn exec_app(exec: &str) -> String {
    app_with(&format!(
        "backup: {{ repository: r, method: Exec, exec: {{ {exec} }} }}"
    ))
}

fn hook_app(hook: &str) -> String {
    app_with(&format!(
        "backup: {{ repository: r, hooks: {{ pre: [{{ {hook} }}] }} }}"
    ))
}

fn restore_file_app(file: &str) -> String {
    exec_app(&format!("command: [redis-cli], restoreFile: {{ {file} }}"))
}

fn storage_app(storage: &str) -> String {
    app_with(&format!("scaling: {{ storage: {{ {storage} }} }}"))
}

fn schedules(n: usize) -> String {
    let list: Vec<String> = (0..n)
        .map(|i| format!("{{ name: s{i}, cron: '@daily' }}"))
        .collect();
    app_with(&format!(
        "backup: {{ repository: r, schedules: [{}] }}",
        list.join(", ")
    ))
}

fn repo(spec: &str) -> String {
    format!(
        "apiVersion: stateward.io/v1alpha1\nkind: BackupRepository\nmetadata: {{ name: r }}\nspec: {spec}\n"
    )
}

/// A repository whose `s3` is `bucket: backups` plus `rest` plus credentials.
fn s3(rest: &str) -> String {
    repo(&format!("{{ s3: {{ bucket: backups, {rest}, {CREDS} }} }}"))
}

fn bucket(name: &str) -> String {
    repo(&format!("{{ s3: {{ bucket: '{name}', {CREDS} }} }}"))
}

fn backup(spec: &str) -> String {
    format!(
        "apiVersion: stateward.io/v1alpha1\nkind: Backup\nmetadata: {{ name: b }}\nspec: {spec}\n"
    )
}

fn restore(spec: &str) -> String {
    format!(
        "apiVersion: stateward.io/v1alpha1\nkind: Restore\nmetadata: {{ name: x }}\nspec: {spec}\n"
    )
}

fn restore_path(path: &str) -> String {
    restore(&format!(
        "{{ source: {{ repositoryPath: {{ repository: r, path: '{path}' }} }}, target: {{ app: db }} }}"
    ))
}

/// One rule: the field its message must name, objects it refuses, objects it admits.
struct Rule {
    rule: &'static str,
    field: &'static str,
    invalid: Vec<String>,
    valid: Vec<String>,
}

fn rule(rule: &'static str, field: &'static str, invalid: Vec<String>, valid: Vec<String>) -> Rule {
    Rule {
        rule,
        field,
        invalid,
        valid,
    }
}

fn rules() -> Vec<Rule> {
    vec![
        // Shape and required fields.
        rule(
            "statefulSetName is required",
            "spec.statefulSetName",
            vec![app("{}"), app("{ backup: { repository: r } }")],
            vec![app("{ statefulSetName: db }")],
        ),
        rule(
            "the backup method is Volume or Exec",
            "spec.backup.method",
            vec![
                app_with("backup: { repository: r, method: Snapshot }"),
                app_with("backup: { repository: r, method: volume }"),
            ],
            vec![app_with("backup: { repository: r, method: Volume }")],
        ),
        rule(
            "method Exec needs exec.command",
            "spec.backup.exec",
            vec![
                app_with("backup: { repository: r, method: Exec }"),
                app_with("backup: { repository: r, method: Exec, exec: { command: [] } }"),
            ],
            vec![exec_app("command: [pg_dumpall]")],
        ),
        rule(
            "backup.repository is required",
            "spec.backup.repository",
            vec![
                app_with("backup: { method: Volume }"),
                app_with("backup: {}"),
            ],
            vec![app_with("backup: { repository: r }")],
        ),
        rule(
            "schedule names are unique DNS labels",
            "spec.backup.schedules[",
            vec![
                app_with(
                    "backup: { repository: r, schedules: [{ name: a, cron: '@daily' }, { name: a, cron: '@hourly' }] }",
                ),
                app_with(
                    "backup: { repository: r, schedules: [{ name: Nightly_1, cron: '@daily' }] }",
                ),
            ],
            vec![app_with(
                "backup: { repository: r, schedules: [{ name: a, cron: '@daily' }, { name: b, cron: '@hourly' }] }",
            )],
        ),
        rule(
            "cron has five fields or a macro",
            "spec.backup.schedules[0].cron",
            vec![
                app_with("backup: { repository: r, schedules: [{ name: a, cron: '0 2 *' }] }"),
                app_with(
                    "backup: { repository: r, schedules: [{ name: a, cron: '@fortnightly' }] }",
                ),
                app_with("backup: { repository: r, schedules: [{ name: a }] }"),
            ],
            vec![app_with(
                "backup: { repository: r, schedules: [{ name: a, cron: '0 2 * * 1-5' }] }",
            )],
        ),
        rule(
            "concurrencyPolicy is Forbid, Replace or Allow",
            "spec.backup.schedules[0].concurrencyPolicy",
            vec![
                app_with(
                    "backup: { repository: r, schedules: [{ name: a, cron: '@daily', concurrencyPolicy: Sometimes }] }",
                ),
                app_with(
                    "backup: { repository: r, schedules: [{ name: a, cron: '@daily', concurrencyPolicy: forbid }] }",
                ),
            ],
            vec![app_with(
                "backup: { repository: r, schedules: [{ name: a, cron: '@daily', concurrencyPolicy: Replace }] }",
            )],
        ),
        rule(
            "startingDeadlineSeconds is between 10 and 86400",
            "spec.backup.schedules[0].startingDeadlineSeconds",
            vec![
                app_with(
                    "backup: { repository: r, schedules: [{ name: a, cron: '@daily', startingDeadlineSeconds: 1 }] }",
                ),
                app_with(
                    "backup: { repository: r, schedules: [{ name: a, cron: '@daily', startingDeadlineSeconds: 100000 }] }",
                ),
            ],
            vec![app_with(
                "backup: { repository: r, schedules: [{ name: a, cron: '@daily', startingDeadlineSeconds: 60 }] }",
            )],
        ),
        rule(
            "retention keeps something",
            "spec.backup.schedules[0].retention",
            vec![
                app_with(
                    "backup: { repository: r, schedules: [{ name: a, cron: '@daily', retention: {} }] }",
                ),
                app_with(
                    "backup: { repository: r, schedules: [{ name: a, cron: '@daily', retention: { keepLast: 0 } }] }",
                ),
            ],
            vec![app_with(
                "backup: { repository: r, schedules: [{ name: a, cron: '@daily', retention: { keepLast: 3 } }] }",
            )],
        ),
        rule(
            "at most 16 schedules",
            "spec.backup.schedules",
            vec![schedules(17), schedules(20)],
            vec![schedules(16)],
        ),
        rule(
            "a hook's timeoutSeconds is between 1 and 3600",
            "spec.backup.hooks.pre[0].timeoutSeconds",
            vec![
                hook_app("name: h, command: [sync], timeoutSeconds: 0"),
                hook_app("name: h, command: [sync], timeoutSeconds: 3601"),
            ],
            vec![hook_app("name: h, command: [sync], timeoutSeconds: 30")],
        ),
        rule(
            "a hook's onError is Fail or Continue",
            "spec.backup.hooks.pre[0].onError",
            vec![
                hook_app("name: h, command: [sync], onError: Ignore"),
                hook_app("name: h, command: [sync], onError: fail"),
            ],
            vec![hook_app("name: h, command: [sync], onError: Continue")],
        ),
        rule(
            "hook names are unique",
            "spec.backup.hooks.pre[1]",
            vec![
                hook_app("name: h, command: [sync] }, { name: h, command: [sync, -f]"),
                hook_app("name: h, command: [sync] }, { name: h, command: [sync]"),
            ],
            vec![hook_app(
                "name: h, command: [sync] }, { name: i, command: [sync, -f]",
            )],
        ),
        rule(
            "metricsPort is between 1 and 65535",
            "spec.monitoring.metricsPort",
            vec![
                app_with("monitoring: { metricsPort: 70000 }"),
                app_with("monitoring: { metricsPort: 0 }"),
            ],
            vec![app_with("monitoring: { metricsPort: 9100 }")],
        ),
        rule(
            "a repository needs both credentials",
            "spec.s3.credentials",
            vec![
                repo("{ s3: { bucket: backups } }"),
                repo(
                    "{ s3: { bucket: backups, credentials: { accessKeyId: { name: s, key: a } } } }",
                ),
            ],
            vec![repo(&format!("{{ s3: {{ bucket: backups, {CREDS} }} }}"))],
        ),
        rule(
            "deletionPolicy is Delete or Retain",
            "spec.deletionPolicy",
            vec![
                backup("{ app: db, deletionPolicy: Shred }"),
                backup("{ app: db, deletionPolicy: delete }"),
            ],
            vec![backup("{ app: db, deletionPolicy: Delete }")],
        ),
        rule(
            "a Backup's deadline is between 60 and 604800 seconds",
            "spec.activeDeadlineSeconds",
            vec![
                backup("{ app: db, activeDeadlineSeconds: 0 }"),
                backup("{ app: db, activeDeadlineSeconds: 604801 }"),
            ],
            vec![backup("{ app: db, activeDeadlineSeconds: 3600 }")],
        ),
        rule(
            "a Restore has exactly one source",
            "spec.source",
            vec![
                restore(
                    "{ source: { backup: b, repositoryPath: { repository: r, path: ns/app/b-1 } }, target: { app: db } }",
                ),
                restore("{ source: {}, target: { app: db } }"),
            ],
            vec![restore("{ source: { backup: b }, target: { app: db } }")],
        ),
        rule(
            "cloneStatefulSetName is a DNS label of at most 52 characters",
            "spec.target.cloneStatefulSetName",
            vec![
                restore(
                    "{ source: { backup: b }, target: { app: db, cloneStatefulSetName: Clone_1 } }",
                ),
                restore(&format!(
                    "{{ source: {{ backup: b }}, target: {{ app: db, cloneStatefulSetName: {} }} }}",
                    "c".repeat(53)
                )),
            ],
            vec![restore(&format!(
                "{{ source: {{ backup: b }}, target: {{ app: db, cloneStatefulSetName: {} }} }}",
                "c".repeat(52)
            ))],
        ),
        rule(
            "createStatefulSet needs cloneStatefulSetName",
            "spec.target.createStatefulSet",
            vec![
                restore("{ source: { backup: b }, target: { app: db, createStatefulSet: true } }"),
                restore(
                    "{ source: { backup: b }, target: { app: db, createStatefulSet: true, keepAppLabels: true } }",
                ),
            ],
            vec![restore(
                "{ source: { backup: b }, target: { app: db, createStatefulSet: true, cloneStatefulSetName: db-copy } }",
            )],
        ),
        rule(
            "a Restore's deadline is between 60 and 604800 seconds",
            "spec.activeDeadlineSeconds",
            vec![
                restore(
                    "{ source: { backup: b }, target: { app: db }, activeDeadlineSeconds: 59 }",
                ),
                restore(
                    "{ source: { backup: b }, target: { app: db }, activeDeadlineSeconds: -1 }",
                ),
            ],
            vec![restore(
                "{ source: { backup: b }, target: { app: db }, activeDeadlineSeconds: 60 }",
            )],
        ),
        // Durations.
        rule(
            "backupMaxAge is a duration between 1m and 400d",
            "spec.monitoring.backupMaxAge",
            vec![
                app_with("monitoring: { backupMaxAge: 0s }"),
                app_with("monitoring: { backupMaxAge: 0h0m }"),
                app_with("monitoring: { backupMaxAge: 401d }"),
                app_with("monitoring: { backupMaxAge: 30s }"),
                app_with("monitoring: { backupMaxAge: 'one day' }"),
                app_with("monitoring: { backupMaxAge: 1h1h }"),
            ],
            vec![
                app_with("monitoring: { backupMaxAge: 26h }"),
                app_with("monitoring: { backupMaxAge: 1d12h }"),
            ],
        ),
        rule(
            "autoExpand.cooldown is a duration between 10s and 30d",
            "spec.scaling.storage.autoExpand.cooldown",
            vec![
                storage_app("autoExpand: { maxSize: 10Gi, cooldown: 0s }"),
                storage_app("autoExpand: { maxSize: 10Gi, cooldown: 5s }"),
                storage_app("autoExpand: { maxSize: 10Gi, cooldown: 31d }"),
            ],
            vec![storage_app(
                "autoExpand: { maxSize: 10Gi, cooldown: 1h30m }",
            )],
        ),
        // Storage.
        rule(
            "storage.size is a positive quantity",
            "spec.scaling.storage.size",
            vec![
                storage_app("size: '0'"),
                storage_app("size: -1Gi"),
                storage_app("size: big"),
            ],
            vec![storage_app("size: 1Gi")],
        ),
        rule(
            "autoExpand.maxSize is a positive quantity",
            "spec.scaling.storage.autoExpand.maxSize",
            vec![
                storage_app("autoExpand: { maxSize: '0' }"),
                storage_app("autoExpand: { maxSize: -5Gi }"),
            ],
            vec![storage_app("autoExpand: { maxSize: 5Gi }")],
        ),
        rule(
            "autoExpand.maxSize is at least size",
            "spec.scaling.storage.autoExpand.maxSize",
            vec![
                storage_app("size: 10Gi, autoExpand: { maxSize: 5Gi }"),
                storage_app("size: 2Gi, autoExpand: { maxSize: 1500Mi }"),
            ],
            vec![storage_app("size: 10Gi, autoExpand: { maxSize: 10Gi }")],
        ),
        // Counts.
        rule(
            "scaling.replicas is not negative",
            "spec.scaling.replicas",
            vec![
                app_with("scaling: { replicas: -1 }"),
                app_with("scaling: { replicas: -100 }"),
            ],
            vec![app_with("scaling: { replicas: 0 }")],
        ),
        rule(
            "minReplicas is not negative nor above maxReplicas",
            "spec.scaling.minReplicas",
            vec![
                app_with("scaling: { minReplicas: -1 }"),
                app_with("scaling: { minReplicas: 5, maxReplicas: 2 }"),
            ],
            vec![app_with("scaling: { minReplicas: 0, maxReplicas: 2 }")],
        ),
        // S3.
        rule(
            "bucket names follow S3's rules",
            "spec.s3.bucket",
            vec![
                bucket("my..backups"),
                bucket("192.168.1.1"),
                bucket("xn--backups"),
                bucket("sthree-backups"),
                bucket("backups-s3alias"),
                bucket("backups--ol-s3"),
                bucket("MyBackups"),
                bucket("ab"),
            ],
            vec![bucket("my.backups-1"), bucket("10.0.0.backups")],
        ),
        rule(
            "the endpoint is a URL with a host, a valid port and no query",
            "spec.s3.endpoint",
            vec![
                s3("endpoint: 'http://'"),
                s3("endpoint: 'http://:9000'"),
                s3("endpoint: 'http://s3.local:99999'"),
                s3("endpoint: 'http://s3.local:0'"),
                s3("endpoint: 'https://s3.local/?versionId=1'"),
                s3("endpoint: 'https://s3.local#x'"),
                s3("endpoint: 'https://user:secret@s3.local'"),
                s3("endpoint: 's3.local:9000'"),
            ],
            vec![
                s3("endpoint: 'https://s3.example.com:9000'"),
                s3("endpoint: 'http://10.0.0.1:9000/'"),
            ],
        ),
        rule(
            "the prefix has no `..`, `.` or empty segment, control character or leading - or /",
            "spec.s3.prefix",
            vec![
                s3("prefix: 'a//b'"),
                s3("prefix: 'a/../b'"),
                s3("prefix: '..'"),
                s3("prefix: 'a/./b'"),
                s3("prefix: \"a\\tb\""),
                s3("prefix: 'a/'"),
                s3("prefix: '/a'"),
                s3("prefix: '-a'"),
            ],
            vec![s3("prefix: team-a/backups.v2")],
        ),
        rule(
            "the region is [a-z0-9-]+",
            "spec.s3.region",
            vec![
                s3("region: US-EAST-1"),
                s3("region: us_east_1"),
                s3("region: '-x'"),
            ],
            vec![s3("region: eu-west-3")],
        ),
        // References to other objects.
        rule(
            "statefulSetName is a DNS subdomain",
            "spec.statefulSetName",
            vec![
                app("{ statefulSetName: Db }"),
                app("{ statefulSetName: db_1 }"),
                app("{ statefulSetName: '-db' }"),
                app("{ statefulSetName: '' }"),
            ],
            vec![app("{ statefulSetName: db.main }")],
        ),
        rule(
            "backup.repository is a DNS subdomain",
            "spec.backup.repository",
            vec![
                app_with("backup: { repository: Repo }"),
                app_with("backup: { repository: 'my repo' }"),
            ],
            vec![app_with("backup: { repository: my-repo }")],
        ),
        rule(
            "a schedule's repository is a DNS subdomain",
            "spec.backup.schedules[0].repository",
            vec![
                app_with(
                    "backup: { repository: r, schedules: [{ name: n, cron: '@daily', repository: Cold }] }",
                ),
                app_with(
                    "backup: { repository: r, schedules: [{ name: n, cron: '@daily', repository: 'a/b' }] }",
                ),
            ],
            vec![app_with(
                "backup: { repository: r, schedules: [{ name: n, cron: '@daily', repository: cold }] }",
            )],
        ),
        rule(
            "a time zone is shaped like an IANA name",
            "spec.backup.schedules[0].timeZone",
            vec![
                app_with(
                    "backup: { repository: r, schedules: [{ name: n, cron: '@daily', timeZone: 'Europe Paris' }] }",
                ),
                app_with(
                    "backup: { repository: r, schedules: [{ name: n, cron: '@daily', timeZone: '../etc/passwd' }] }",
                ),
            ],
            vec![app_with(
                "backup: { repository: r, schedules: [{ name: n, cron: '@daily', timeZone: America/Argentina/Buenos_Aires }] }",
            )],
        ),
        rule(
            "Backup.app is a DNS subdomain",
            "spec.app",
            vec![
                backup("{ app: 'My App' }"),
                backup("{ app: 'db/x' }"),
                backup("{}"),
            ],
            vec![backup("{ app: db }")],
        ),
        rule(
            "Backup.repository is a DNS subdomain",
            "spec.repository",
            vec![
                backup("{ app: db, repository: Repo }"),
                backup("{ app: db, repository: 'r.' }"),
            ],
            vec![backup("{ app: db, repository: r.cold }")],
        ),
        rule(
            "Restore.source.backup is a DNS subdomain",
            "spec.source.backup",
            vec![
                restore("{ source: { backup: 'B!' }, target: { app: db } }"),
                restore("{ source: { backup: '' }, target: { app: db } }"),
            ],
            vec![restore(
                "{ source: { backup: nightly-1 }, target: { app: db } }",
            )],
        ),
        rule(
            "Restore.target.app is a DNS subdomain",
            "spec.target.app",
            vec![
                restore("{ source: { backup: b }, target: { app: DB } }"),
                restore("{ source: { backup: b }, target: { app: 'd b' } }"),
            ],
            vec![restore("{ source: { backup: b }, target: { app: db } }")],
        ),
        rule(
            "Restore.source.repositoryPath.repository is a DNS subdomain",
            "spec.source.repositoryPath.repository",
            vec![
                restore(
                    "{ source: { repositoryPath: { repository: R, path: ns/app/b-1 } }, target: { app: db } }",
                ),
                restore(
                    "{ source: { repositoryPath: { repository: 'r_1', path: ns/app/b-1 } }, target: { app: db } }",
                ),
            ],
            vec![restore(
                "{ source: { repositoryPath: { repository: r, path: ns/app/b-1 } }, target: { app: db } }",
            )],
        ),
        rule(
            "Secret names are DNS subdomains",
            "spec.s3.credentials.accessKeyId.name",
            vec![
                repo(
                    "{ s3: { bucket: backups, credentials: { accessKeyId: { name: 'S3 creds', key: a }, secretAccessKey: { name: s, key: b } } } }",
                ),
                repo(
                    "{ s3: { bucket: backups, credentials: { accessKeyId: { name: 's/x', key: a }, secretAccessKey: { name: s, key: b } } } }",
                ),
            ],
            vec![repo(
                "{ s3: { bucket: backups, credentials: { accessKeyId: { name: s3.creds, key: a }, secretAccessKey: { name: s, key: b } } } }",
            )],
        ),
        rule(
            "Secret keys follow Kubernetes' key rule",
            "spec.encryption.recipient.key",
            vec![
                repo(&format!(
                    "{{ s3: {{ bucket: backups, {CREDS} }}, encryption: {{ recipient: {{ name: age, key: 'a/b' }} }} }}"
                )),
                repo(&format!(
                    "{{ s3: {{ bucket: backups, {CREDS} }}, encryption: {{ recipient: {{ name: age, key: 'my key' }} }} }}"
                )),
            ],
            vec![repo(&format!(
                "{{ s3: {{ bucket: backups, {CREDS} }}, encryption: {{ recipient: {{ name: age, key: recipient.txt }} }} }}"
            ))],
        ),
        rule(
            "exec.container is a DNS label",
            "spec.backup.exec.container",
            vec![
                exec_app("command: [pg_dumpall], container: App"),
                exec_app("command: [pg_dumpall], container: 'a.b'"),
                exec_app("command: [pg_dumpall], container: ''"),
            ],
            vec![exec_app("command: [pg_dumpall], container: postgres")],
        ),
        rule(
            "a hook's container is a DNS label",
            "spec.backup.hooks.pre[0].container",
            vec![
                hook_app("name: h, command: [sync], container: Redis"),
                hook_app("name: h, command: [sync], container: ''"),
            ],
            vec![hook_app("name: h, command: [sync], container: redis")],
        ),
        rule(
            "restoreFile.volume is a DNS label",
            "spec.backup.exec.restoreFile.volume",
            vec![
                restore_file_app("volume: Data, path: dump.rdb"),
                restore_file_app("volume: data.x, path: dump.rdb"),
            ],
            vec![restore_file_app("volume: data, path: dump.rdb")],
        ),
        rule(
            "allowRestoreFromNamespaces is a set of DNS labels",
            "spec.allowRestoreFromNamespaces",
            vec![
                repo(&format!(
                    "{{ s3: {{ bucket: backups, {CREDS} }}, allowRestoreFromNamespaces: [Team_A] }}"
                )),
                repo(&format!(
                    "{{ s3: {{ bucket: backups, {CREDS} }}, allowRestoreFromNamespaces: [a.b] }}"
                )),
                repo(&format!(
                    "{{ s3: {{ bucket: backups, {CREDS} }}, allowRestoreFromNamespaces: [team-a, team-a] }}"
                )),
            ],
            vec![repo(&format!(
                "{{ s3: {{ bucket: backups, {CREDS} }}, allowRestoreFromNamespaces: [team-a, team-b] }}"
            ))],
        ),
        // Paths.
        rule(
            "restoreFile.files[].path stays inside the volume",
            "spec.backup.exec.restoreFile.files[0].path",
            vec![
                restore_file_app(
                    "volume: data, path: d/dump.rdb, files: [{ path: 'd/../x', content: '' }]",
                ),
                restore_file_app(
                    "volume: data, path: d/dump.rdb, files: [{ path: '-x', content: '' }]",
                ),
                restore_file_app(
                    "volume: data, path: d/dump.rdb, files: [{ path: 'd//x', content: '' }]",
                ),
            ],
            vec![restore_file_app(
                "volume: data, path: d/dump.rdb, files: [{ path: d/manifest, content: x }]",
            )],
        ),
        rule(
            "restoreFile.path stays inside the volume and is no option",
            "spec.backup.exec.restoreFile.path",
            vec![
                restore_file_app("volume: data, path: '../dump.rdb'"),
                restore_file_app("volume: data, path: '-dump.rdb'"),
                restore_file_app("volume: data, path: 'a/./dump.rdb'"),
            ],
            vec![restore_file_app(
                "volume: data, path: appendonlydir/base.rdb",
            )],
        ),
        rule(
            "restoreFile.alsoRemove holds names at the volume root, no option",
            "spec.backup.exec.restoreFile.alsoRemove",
            vec![
                restore_file_app("volume: data, path: dump.rdb, alsoRemove: ['-rf']"),
                restore_file_app("volume: data, path: dump.rdb, alsoRemove: ['..']"),
                restore_file_app("volume: data, path: dump.rdb, alsoRemove: ['a/b']"),
            ],
            vec![restore_file_app(
                "volume: data, path: dump.rdb, alsoRemove: [appendonlydir]",
            )],
        ),
        rule(
            "importPath is <namespace>/<app>/<backup>-<uid>",
            "spec.importPath",
            vec![
                backup("{ app: db, importPath: 'ns/../b-1' }"),
                backup("{ app: db, importPath: 'ns/app/..' }"),
                backup("{ app: db, importPath: '-ns/app/b-1' }"),
                backup("{ app: db, importPath: 'ns//b-1' }"),
            ],
            vec![backup("{ app: db, importPath: team-a/db/db-1-0f3c }")],
        ),
        rule(
            "repositoryPath.path is <namespace>/<app>/<backup>-<uid>",
            "spec.source.repositoryPath.path",
            vec![
                restore_path("../app/b-1"),
                restore_path("ns/./b-1"),
                restore_path("just-a-name"),
                restore_path("ns/app/b-1/volumes"),
            ],
            vec![restore_path("team-a/db/db-1-0f3c")],
        ),
        // Backup.
        rule(
            "an import takes no deletionPolicy: Delete",
            "spec.deletionPolicy",
            vec![
                backup("{ app: db, importPath: ns/app/b-1, deletionPolicy: Delete }"),
                backup(
                    "{ app: db, repository: r, importPath: ns/app/b-1, deletionPolicy: Delete }",
                ),
            ],
            vec![backup(
                "{ app: db, importPath: ns/app/b-1, deletionPolicy: Retain }",
            )],
        ),
        rule(
            "an import takes no method, replicas or deadline",
            "spec.importPath",
            vec![
                backup("{ app: db, importPath: ns/app/b-1, method: Exec }"),
                backup("{ app: db, importPath: ns/app/b-1, replicas: One }"),
                backup("{ app: db, importPath: ns/app/b-1, activeDeadlineSeconds: 600 }"),
            ],
            vec![backup("{ app: db, repository: r, importPath: ns/app/b-1 }")],
        ),
        // StatefulApp.
        rule(
            "restoreCommand and restoreFile are not set together",
            "spec.backup.exec.restoreFile",
            vec![
                exec_app(
                    "command: [redis-cli], restoreCommand: [redis-cli], restoreFile: { volume: data, path: dump.rdb }",
                ),
                exec_app(
                    "command: [pg_dumpall], restoreCommand: [psql, -f, '-'], restoreFile: { volume: data, path: dump.sql }",
                ),
            ],
            vec![
                exec_app("command: [pg_dumpall], restoreCommand: [psql]"),
                exec_app("command: [redis-cli], restoreFile: { volume: data, path: dump.rdb }"),
            ],
        ),
        rule(
            "exec commands have no empty item",
            "spec.backup.exec.command[0]",
            vec![exec_app("command: ['']"), exec_app("command: ['', x]")],
            vec![exec_app("command: [pg_dumpall]")],
        ),
        rule(
            "a restore command has no empty item",
            "spec.backup.exec.restoreCommand[1]",
            vec![
                exec_app("command: [pg_dumpall], restoreCommand: [psql, '']"),
                exec_app("command: [pg_dumpall], restoreCommand: [psql, '', x]"),
            ],
            vec![exec_app(
                "command: [pg_dumpall], restoreCommand: [psql, '-U', postgres]",
            )],
        ),
        rule(
            "hook commands have no empty item",
            "spec.backup.hooks.pre[0].command[0]",
            vec![
                hook_app("name: h, command: ['']"),
                hook_app("name: h, command: ['', sync]"),
            ],
            vec![hook_app("name: h, command: [sync]")],
        ),
    ]
}

#[tokio::test]
async fn every_rule_refuses_invalid_objects_naming_the_field_and_admits_a_valid_neighbour()
-> Result<()> {
    let (cluster, ns) = setup("admission").await?;
    let rules = rules();
    let mut failures = Vec::new();
    let mut objects = 0;
    for r in &rules {
        ensure!(
            r.invalid.len() >= 2 && !r.valid.is_empty(),
            "{}: needs two invalid objects and a valid one",
            r.rule
        );
        for yaml in &r.invalid {
            objects += 1;
            match create(&cluster.client, &ns.name, yaml, true).await? {
                Outcome::Refused(message) if message.contains(r.field) => {}
                Outcome::Refused(message) => failures.push(format!(
                    "{}: the message does not name {}: {message}\n  {yaml}",
                    r.rule, r.field
                )),
                other => failures.push(format!("{}: {other}\n  {yaml}", r.rule)),
            }
        }
        for yaml in &r.valid {
            objects += 1;
            match create(&cluster.client, &ns.name, yaml, true).await? {
                Outcome::Admitted => {}
                other => failures.push(format!(
                    "{}: the valid neighbour was not admitted: {other}\n  {yaml}",
                    r.rule
                )),
            }
        }
    }
    if !failures.is_empty() {
        bail!(
            "{} of {objects} objects ({} rules) were judged wrongly:\n{}",
            failures.len(),
            rules.len(),
            failures.join("\n")
        );
    }
    // A dry run stored nothing.
    let left = api(&cluster.client, &ns.name, "StatefulApp")
        .list(&Default::default())
        .await?;
    ensure!(
        left.items.is_empty(),
        "a dry run stored {:?}",
        left.items.len()
    );
    ns.cleanup().await
}

/// Patches `name` (a merge patch, as a dry run) and returns what the API server said.
async fn patch(api: &Api<DynamicObject>, name: &str, patch: serde_json::Value) -> Outcome {
    let params = PatchParams {
        dry_run: true,
        ..Default::default()
    };
    Outcome::of(api.patch(name, &params, &Patch::Merge(patch)).await)
}

fn expect_refused(what: &str, outcome: Outcome, field: &str, failures: &mut Vec<String>) {
    match outcome {
        Outcome::Refused(m) if m.contains(field) => {}
        other => failures.push(format!(
            "{what}: expected a refusal naming {field}, got {other}"
        )),
    }
}

fn expect_admitted(what: &str, outcome: Outcome, failures: &mut Vec<String>) {
    if !matches!(outcome, Outcome::Admitted) {
        failures.push(format!("{what}: expected it admitted, got {outcome}"));
    }
}

#[tokio::test]
async fn a_backups_spec_admits_only_setting_cancel_to_true() -> Result<()> {
    let (cluster, ns) = setup("backup-immutable").await?;
    let backups = api(&cluster.client, &ns.name, "Backup");
    let mut failures = Vec::new();
    // A Backup with every optional field unset but deletionPolicy (defaulted).
    create(&cluster.client, &ns.name, &backup("{ app: db }"), false).await?;
    // One with overrides set.
    create(
        &cluster.client,
        &ns.name,
        &backup("{ app: db, repository: r, method: Exec, activeDeadlineSeconds: 600 }")
            .replace("name: b", "name: b2"),
        false,
    )
    .await?;
    let refused = [
        (
            "changing app with cancel",
            "b",
            serde_json::json!({"spec": {"app": "other", "cancel": true}}),
        ),
        (
            "adding a repository with cancel",
            "b",
            serde_json::json!({"spec": {"repository": "r", "cancel": true}}),
        ),
        (
            "changing deletionPolicy with cancel",
            "b",
            serde_json::json!({"spec": {"deletionPolicy": "Delete", "cancel": true}}),
        ),
        (
            "changing the method alone",
            "b2",
            serde_json::json!({"spec": {"method": "Volume"}}),
        ),
        (
            "removing the repository with cancel",
            "b2",
            serde_json::json!({"spec": {"repository": null, "cancel": true}}),
        ),
        (
            "changing the deadline with cancel",
            "b2",
            serde_json::json!({"spec": {"activeDeadlineSeconds": 900, "cancel": true}}),
        ),
        (
            "setting cancel to false",
            "b",
            serde_json::json!({"spec": {"cancel": false}}),
        ),
    ];
    for (what, name, body) in refused {
        expect_refused(
            what,
            patch(&backups, name, body).await,
            "spec",
            &mut failures,
        );
    }
    expect_admitted(
        "setting cancel: true",
        patch(
            &backups,
            "b2",
            serde_json::json!({"spec": {"cancel": true}}),
        )
        .await,
        &mut failures,
    );
    // Once cancelled for real, it cannot be taken back, nor anything else changed.
    backups
        .patch(
            "b",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"cancel": true}})),
        )
        .await
        .context("setting cancel: true")?;
    expect_refused(
        "un-cancelling",
        patch(
            &backups,
            "b",
            serde_json::json!({"spec": {"cancel": false}}),
        )
        .await,
        "spec",
        &mut failures,
    );
    expect_refused(
        "changing the app of a cancelled Backup",
        patch(&backups, "b", serde_json::json!({"spec": {"app": "x"}})).await,
        "spec",
        &mut failures,
    );
    expect_admitted(
        "applying the same spec again",
        patch(&backups, "b", serde_json::json!({"spec": {"cancel": true}})).await,
        &mut failures,
    );
    if !failures.is_empty() {
        bail!("{}", failures.join("\n"));
    }
    ns.cleanup().await
}

#[tokio::test]
async fn a_storage_size_never_shrinks_also_not_in_two_steps() -> Result<()> {
    let (cluster, ns) = setup("shrink").await?;
    let apps = api(&cluster.client, &ns.name, "StatefulApp");
    let mut failures = Vec::new();
    create(&cluster.client, &ns.name, &storage_app("size: 2Gi"), false).await?;
    let size = |s: Option<&str>| serde_json::json!({"spec": {"scaling": {"storage": {"size": s}}}});
    expect_admitted(
        "growing",
        patch(&apps, "a", size(Some("3Gi"))).await,
        &mut failures,
    );
    expect_refused(
        "shrinking in one step",
        patch(&apps, "a", size(Some("1Gi"))).await,
        "spec.scaling.storage.size",
        &mut failures,
    );
    // The scaling controller records the size it applied; this test writes it as the
    // controller would (no controller runs here).
    apps.patch_status(
        "a",
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"status": {"scaling": {"appliedSize": "2Gi"}}})),
    )
    .await
    .context("writing status.scaling.appliedSize")?;
    // Step one: unset the size (admitted: nothing to compare).
    apps.patch("a", &PatchParams::default(), &Patch::Merge(size(None)))
        .await
        .context("unsetting the size")?;
    // Step two: a smaller size than the one applied.
    expect_refused(
        "shrinking in two steps",
        patch(&apps, "a", size(Some("1Gi"))).await,
        "spec.scaling.storage.size",
        &mut failures,
    );
    expect_refused(
        "shrinking in two steps, in other units",
        patch(&apps, "a", size(Some("2000Mi"))).await,
        "spec.scaling.storage.size",
        &mut failures,
    );
    expect_admitted(
        "setting the applied size again",
        patch(&apps, "a", size(Some("2048Mi"))).await,
        &mut failures,
    );
    if !failures.is_empty() {
        bail!("{}", failures.join("\n"));
    }
    ns.cleanup().await
}

#[tokio::test]
async fn a_restore_and_an_apps_statefulset_name_are_immutable() -> Result<()> {
    let (cluster, ns) = setup("immutable").await?;
    let mut failures = Vec::new();
    create(
        &cluster.client,
        &ns.name,
        &app_with("backup: { repository: r }"),
        false,
    )
    .await?;
    create(
        &cluster.client,
        &ns.name,
        &restore("{ source: { backup: b }, target: { app: db } }"),
        false,
    )
    .await?;
    let apps = api(&cluster.client, &ns.name, "StatefulApp");
    let restores = api(&cluster.client, &ns.name, "Restore");
    expect_refused(
        "renaming the StatefulSet",
        patch(
            &apps,
            "a",
            serde_json::json!({"spec": {"statefulSetName": "other"}}),
        )
        .await,
        "spec.statefulSetName",
        &mut failures,
    );
    expect_admitted(
        "changing the repository",
        patch(
            &apps,
            "a",
            serde_json::json!({"spec": {"backup": {"repository": "r2"}}}),
        )
        .await,
        &mut failures,
    );
    for (what, body) in [
        (
            "retargeting a Restore",
            serde_json::json!({"spec": {"target": {"app": "other"}}}),
        ),
        (
            "turning a Restore into a dry run",
            serde_json::json!({"spec": {"dryRun": true}}),
        ),
    ] {
        expect_refused(
            what,
            patch(&restores, "x", body).await,
            "spec",
            &mut failures,
        );
    }
    if !failures.is_empty() {
        bail!("{}", failures.join("\n"));
    }
    ns.cleanup().await
}
