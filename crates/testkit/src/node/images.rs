//! Images the local node can run, mapped to programs on this machine.
//!
//! | image (last path segment, any tag) | runs |
//! |---|---|
//! | `stateward-probe` | the testkit's probe binary (entrypoint) |
//! | `stateward` | the project's `stateward` binary (entrypoint), when built; runs as 65532:65532 (its `USER`) |
//! | `redis` | Debian's `redis-server`, working dir `/data`, `--protected-mode no` as the official image adds |
//! | `postgres` | Debian's PostgreSQL through an entrypoint that initialises `$PGDATA` as the official image does |
//! | anything else | no process: the pod is Running and Ready; exec into it fails with a clear message |

use std::path::{Path, PathBuf};

/// How the node runs a container of some image.
#[derive(Debug, Clone, PartialEq)]
pub enum ImageProgram {
    /// A real process: Docker semantics (`command` replaces the entrypoint, `args` the
    /// default command).
    Process {
        entrypoint: Vec<String>,
        default_cmd: Vec<String>,
        working_dir: Option<String>,
        /// Extra directories on $PATH (before the system ones).
        extra_path: Vec<String>,
        /// Directories that get a private tmpfs (sockets, locks).
        tmpfs: Vec<String>,
        /// The image's own environment (the pod spec's env overrides it).
        env: Vec<(String, String)>,
        /// The image's `USER` (uid, gid); `None` is root, as an image without one.
        user: Option<(u32, u32)>,
        kind: Known,
    },
    /// The pod runs no process for this container.
    NoProcess,
}

/// Images with special argument handling.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Known {
    Project,
    Redis,
    Postgres,
}

/// The `USER` of the project's image (as in its Dockerfile).
pub const STATEWARD_USER: u32 = 65532;

/// The repository-less, tag-less name of an image reference.
pub fn short_name(image: &str) -> &str {
    let without_digest = image.split('@').next().unwrap_or(image);
    let last = without_digest.rsplit('/').next().unwrap_or(without_digest);
    last.split(':').next().unwrap_or(last)
}

/// Finds the PostgreSQL server binaries Debian installed (`/usr/lib/postgresql/<v>/bin`).
pub fn postgres_bin_dir() -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("bin"))
        .filter(|p| p.join("postgres").is_file())
        .collect();
    dirs.sort();
    dirs.pop()
}

pub fn resolve(image: &str, bin_dir: &Path) -> ImageProgram {
    let bin = |name: &str| bin_dir.join(name).to_string_lossy().into_owned();
    match short_name(image) {
        "stateward-probe" => ImageProgram::Process {
            entrypoint: vec![bin("stateward-probe")],
            default_cmd: vec![],
            working_dir: None,
            extra_path: vec![],
            tmpfs: vec!["/tmp".into()],
            env: vec![],
            user: None,
            kind: Known::Project,
        },
        "stateward" => ImageProgram::Process {
            entrypoint: vec![bin("stateward")],
            default_cmd: vec![],
            working_dir: None,
            extra_path: vec![],
            tmpfs: vec!["/tmp".into()],
            env: vec![],
            // The Dockerfile's `USER 65532:65532` (distroless `nonroot`).
            user: Some((STATEWARD_USER, STATEWARD_USER)),
            kind: Known::Project,
        },
        "redis" => ImageProgram::Process {
            entrypoint: vec![],
            default_cmd: vec!["redis-server".into()],
            working_dir: Some("/data".into()),
            extra_path: vec![],
            tmpfs: vec!["/tmp".into()],
            env: vec![],
            user: None,
            kind: Known::Redis,
        },
        "postgres" => ImageProgram::Process {
            entrypoint: vec![bin("postgres-entrypoint.sh")],
            default_cmd: vec!["postgres".into()],
            working_dir: None,
            extra_path: postgres_bin_dir()
                .map(|p| vec![p.to_string_lossy().into_owned()])
                .unwrap_or_default(),
            tmpfs: vec!["/tmp".into(), "/var/run/postgresql".into()],
            env: vec![("PGDATA".into(), "/var/lib/postgresql/data".into())],
            user: None,
            kind: Known::Postgres,
        },
        _ => ImageProgram::NoProcess,
    }
}

/// The program and arguments of a container, per Docker/Kubernetes rules.
pub fn argv(
    entrypoint: &[String],
    default_cmd: &[String],
    command: Option<&[String]>,
    args: Option<&[String]>,
    kind: Known,
) -> Vec<String> {
    let mut argv: Vec<String> = match (command, args) {
        (Some(command), Some(args)) => command.iter().chain(args).cloned().collect(),
        (Some(command), None) => command.to_vec(),
        (None, Some(args)) => entrypoint.iter().chain(args).cloned().collect(),
        (None, None) => entrypoint.iter().chain(default_cmd).cloned().collect(),
    };
    // The official redis image's entrypoint turns protected mode off when no config file
    // is given, so other pods can connect without a password.
    if kind == Known::Redis
        && argv
            .first()
            .map(|p| p.ends_with("redis-server"))
            .unwrap_or(false)
        && !argv
            .iter()
            .any(|a| a.ends_with(".conf") || a == "--protected-mode")
    {
        argv.push("--protected-mode".into());
        argv.push("no".into());
    }
    argv
}

/// The official postgres image's entrypoint, reduced to what the project relies on:
/// initialise an empty `$PGDATA` (superuser `$POSTGRES_USER`, password
/// `$POSTGRES_PASSWORD`, optional `$POSTGRES_DB`), listen on all addresses, then run the
/// server as the `postgres` user — or, started as another user (`runAsUser`), as that
/// user, with `initdb` given a passwd entry through nss_wrapper when the uid has none.
pub const POSTGRES_ENTRYPOINT: &str = r#"#!/bin/sh
set -e
: "${PGDATA:=/var/lib/postgresql/data}"
export PGDATA
if [ "$1" = postgres ] && [ "$(id -u)" = 0 ]; then
  mkdir -p "$PGDATA" /var/run/postgresql
  chown postgres:postgres "$PGDATA" /var/run/postgresql
  chmod 700 "$PGDATA"
  exec setpriv --reuid=postgres --regid=postgres --init-groups "$0" "$@"
fi
if [ "$1" = postgres ] && [ "$(id -u)" != 0 ]; then
  mkdir -p "$PGDATA"
  chmod 700 "$PGDATA" 2>/dev/null || :
fi
if [ "$1" = postgres ] && [ ! -s "$PGDATA/PG_VERSION" ]; then
  user="${POSTGRES_USER:-postgres}"
  if ! getent passwd "$(id -u)" >/dev/null 2>&1; then
    for wrapper in /usr/lib/*/libnss_wrapper.so /usr/lib/libnss_wrapper.so; do
      if [ -s "$wrapper" ]; then
        NSS_WRAPPER_PASSWD="$(mktemp)"
        NSS_WRAPPER_GROUP="$(mktemp)"
        export LD_PRELOAD="$wrapper" NSS_WRAPPER_PASSWD NSS_WRAPPER_GROUP
        printf 'postgres:x:%s:%s:PostgreSQL:%s:/bin/false\n' "$(id -u)" "$(id -g)" "$PGDATA" > "$NSS_WRAPPER_PASSWD"
        printf 'postgres:x:%s:\n' "$(id -g)" > "$NSS_WRAPPER_GROUP"
        break
      fi
    done
  fi
  if [ -z "$POSTGRES_PASSWORD" ] && [ "$POSTGRES_HOST_AUTH_METHOD" != trust ]; then
    echo "Error: Database is uninitialized and superuser password is not specified." >&2
    echo "       Set POSTGRES_PASSWORD (or POSTGRES_HOST_AUTH_METHOD=trust)." >&2
    exit 1
  fi
  pwfile="$(mktemp)"
  printf '%s\n' "${POSTGRES_PASSWORD:-unused}" > "$pwfile"
  initdb --username="$user" --pwfile="$pwfile" --auth-local=trust --auth-host=scram-sha-256 >/dev/null
  rm -f "$pwfile"
  echo "listen_addresses = '*'" >> "$PGDATA/postgresql.conf"
  echo "host all all all ${POSTGRES_HOST_AUTH_METHOD:-scram-sha-256}" >> "$PGDATA/pg_hba.conf"
  if [ -n "$POSTGRES_DB" ] && [ "$POSTGRES_DB" != "$user" ]; then
    echo "CREATE DATABASE \"$POSTGRES_DB\";" | postgres --single -D "$PGDATA" -j postgres >/dev/null
  fi
  if [ -n "$NSS_WRAPPER_PASSWD" ]; then
    rm -f "$NSS_WRAPPER_PASSWD" "$NSS_WRAPPER_GROUP"
    unset LD_PRELOAD NSS_WRAPPER_PASSWD NSS_WRAPPER_GROUP
  fi
  echo "PostgreSQL init process complete; ready for start up."
fi
exec "$@"
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_names_drop_registry_tag_and_digest() {
        assert_eq!(short_name("redis"), "redis");
        assert_eq!(short_name("docker.io/library/redis:7.2"), "redis");
        assert_eq!(short_name("localhost:5000/stateward:dev"), "stateward");
        assert_eq!(short_name("ghcr.io/x/postgres@sha256:abc"), "postgres");
    }

    #[test]
    fn docker_argument_rules() {
        let ep = vec!["/bin/probe".to_string()];
        let cmd = vec!["serve".to_string()];
        let args = vec!["--port".to_string(), "80".to_string()];
        assert_eq!(
            argv(&ep, &cmd, None, None, Known::Project),
            vec!["/bin/probe", "serve"]
        );
        assert_eq!(
            argv(&ep, &cmd, None, Some(&args), Known::Project),
            vec!["/bin/probe", "--port", "80"]
        );
        assert_eq!(
            argv(&ep, &cmd, Some(&cmd), None, Known::Project),
            vec!["serve"]
        );
    }

    #[test]
    fn redis_gets_protected_mode_off_unless_configured() {
        let default = vec!["redis-server".to_string()];
        assert_eq!(
            argv(&[], &default, None, None, Known::Redis),
            vec!["redis-server", "--protected-mode", "no"]
        );
        let conf = vec!["redis-server".to_string(), "/etc/redis.conf".to_string()];
        assert_eq!(argv(&[], &default, Some(&conf), None, Known::Redis), conf);
    }

    #[test]
    fn unknown_images_run_no_process() {
        assert_eq!(
            resolve("nginx:1.27", Path::new("/x")),
            ImageProgram::NoProcess
        );
    }
}
