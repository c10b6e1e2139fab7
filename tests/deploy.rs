//! deploy/: every manifest parses and names only what exists. Kubernetes
//! manifests have the required fields, probes, resources, security context
//! and grace period; every `JETSOURCE__...` variable and configuration file
//! loads through `Config` (which refuses unknown keys); every binary is a
//! `[[bin]]` of the bank and every flag one its `--help` lists; the NATS
//! configurations are accepted by nats-server (`-t`) with nats/accounts.conf;
//! the Redis ACL users, started on a real redis-server, let the projector's
//! URL write its keys and the query URL only read.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use jetsource_core::config::Config;
use jetsource_test_support::{nats_server_binary, workspace_binary, RedisServer};
use serde_json::Value;

/// Variables the binaries read besides `JETSOURCE__<SECTION>__<KEY>`.
const READ_BY_BINARIES: &[&str] = &["JETSOURCE_CONFIG", "NATS_URL", "RUST_LOG"];

/// The package whose binaries deploy/ runs, and the CLI among them (the
/// others are workers, each with a Deployment, a compose service and a unit).
const APP_PACKAGE: &str = "jetsource-bank";
const CLI: &str = "jetsource";

/// The workers' grace period must exceed their own 10 s bound on stopping.
const MIN_GRACE_SECS: u64 = 11;

fn root() -> PathBuf {
    jetsource_tests::workspace_root()
}

fn deploy(path: &str) -> PathBuf {
    root().join("deploy").join(path)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The application package as `cargo metadata` sees it: its binaries and
/// version (the image tag).
struct App {
    bins: BTreeSet<String>,
    version: String,
}

impl App {
    fn load() -> Self {
        let metadata: Value = jetsource_tests::cargo_metadata();
        let package = metadata["packages"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == APP_PACKAGE)
            .unwrap_or_else(|| panic!("no package {APP_PACKAGE} in the workspace"));
        let bins = package["targets"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|t| t["kind"].as_array().unwrap().iter().any(|k| k == "bin"))
            .map(|t| t["name"].as_str().unwrap().to_owned())
            .collect();
        Self {
            bins,
            version: package["version"].as_str().unwrap().to_owned(),
        }
    }

    fn image(&self) -> String {
        format!("{APP_PACKAGE}:{}", self.version)
    }

    fn workers(&self) -> BTreeSet<String> {
        self.bins.iter().filter(|b| *b != CLI).cloned().collect()
    }

    /// Checks a command line (`argv[0]` a path or name): the binary is one
    /// of ours, every flag is in its `--help`, there are no positional
    /// arguments. Returns the binary's name and the `--config` value.
    fn command_line(&self, what: &str, argv: &[String]) -> (String, Option<String>) {
        let bin = Path::new(argv.first().unwrap_or_else(|| panic!("{what}: no command")))
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        assert!(
            self.bins.contains(&bin),
            "{what}: runs {bin}, not a [[bin]] of {APP_PACKAGE} ({:?})",
            self.bins
        );
        let help = Command::new(workspace_binary(&bin))
            .arg("--help")
            .output()
            .unwrap();
        let help = String::from_utf8_lossy(&help.stdout).into_owned();
        let mut config = None;
        let mut args = argv[1..].iter();
        while let Some(arg) = args.next() {
            let Some(flag) = arg.strip_prefix("--") else {
                panic!("{what}: {bin} takes no argument {arg:?}");
            };
            let (name, inline) = match flag.split_once('=') {
                Some((name, value)) => (name, Some(value.to_owned())),
                None => (flag, None),
            };
            let listed = help.match_indices(&format!("--{name}")).any(|(i, m)| {
                !help[i + m.len()..].starts_with(|c: char| c.is_ascii_alphanumeric() || c == '-')
            });
            assert!(listed, "{what}: {bin} has no flag --{name}:\n{help}");
            if name == "config" {
                let value = inline.or_else(|| args.next().cloned());
                config = Some(value.unwrap_or_else(|| panic!("{what}: --config without a value")));
            }
        }
        (bin, config)
    }
}

/// Every YAML document of `text`, merge keys (`<<: *anchor`) applied.
fn yaml_docs(what: &str, text: &str) -> Vec<Value> {
    use serde::Deserialize;
    serde_norway::Deserializer::from_str(text)
        .map(|doc| {
            let mut value = serde_norway::Value::deserialize(doc)
                .unwrap_or_else(|e| panic!("{what}: not YAML: {e}"));
            value
                .apply_merge()
                .unwrap_or_else(|e| panic!("{what}: {e}"));
            serde_json::to_value(value).unwrap_or_else(|e| panic!("{what}: {e}"))
        })
        .filter(|doc| !doc.is_null())
        .collect()
}

fn str_of<'a>(what: &str, value: &'a Value, pointer: &str) -> &'a str {
    value
        .pointer(pointer)
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| panic!("{what}: {pointer} missing or not a string"))
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_array()
        .into_iter()
        .flatten()
        .map(|v| match v {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        })
        .collect()
}

/// `env` as a TOML document of the keys the `JETSOURCE__` variables set,
/// valued as the config crate's `try_parsing` reads them.
fn env_as_toml(env: &[(String, String)]) -> String {
    let mut toml = String::new();
    for (name, value) in env {
        let Some(path) = name
            .to_ascii_uppercase()
            .strip_prefix("JETSOURCE__")
            .map(str::to_ascii_lowercase)
        else {
            continue;
        };
        let key: Vec<String> = path
            .split("__")
            .map(|part| serde_json::to_string(part).unwrap())
            .collect();
        let literal = if value.parse::<i64>().is_ok() || value == "true" || value == "false" {
            value.clone()
        } else {
            serde_json::to_string(value).unwrap()
        };
        toml.push_str(&format!("{} = {literal}\n", key.join(".")));
    }
    toml
}

/// Loads `file` and, separately, the keys set by `env` through `Config`:
/// an unknown section or key, a bad value or an incomplete credential
/// fails. Variables other than `JETSOURCE__...` must be ones the binaries
/// read, or be used by another setting (`used` holds the text that may
/// refer to them: `$(NAME)`, `$NAME`).
fn check_config(what: &str, file: Option<&Path>, env: &[(String, String)], used: &str) {
    if let Some(file) = file {
        Config::load(Some(file))
            .unwrap_or_else(|e| panic!("{what}: {} does not load: {e}", file.display()));
    }
    for (name, _) in env {
        if name.to_ascii_uppercase().starts_with("JETSOURCE__")
            || READ_BY_BINARIES.contains(&name.as_str())
        {
            continue;
        }
        assert!(
            used.contains(&format!("$({name})")) || used.contains(&format!("${name}")),
            "{what}: environment variable {name} is read by no binary and used by nothing"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("env.toml");
    let toml = env_as_toml(env);
    std::fs::write(&path, &toml).unwrap();
    Config::load(Some(&path))
        .unwrap_or_else(|e| panic!("{what}: its JETSOURCE__ variables do not load: {e}\n{toml}"));
}

/// nats/accounts.conf: its users and the password variables it reads.
struct Accounts {
    path: PathBuf,
    users: BTreeSet<String>,
    variables: BTreeSet<String>,
}

impl Accounts {
    fn load() -> Self {
        let path = root().join("nats/accounts.conf");
        let text = read(&path);
        let users = text
            .lines()
            .filter_map(|l| l.trim().strip_prefix("user:"))
            .map(|u| u.trim().to_owned())
            .collect();
        let variables = text
            .lines()
            .filter(|l| !l.trim_start().starts_with('#'))
            .flat_map(|l| l.split('$').skip(1))
            .map(|v| {
                v.chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect::<String>()
            })
            .filter(|v| v.starts_with("JETSOURCE_"))
            .collect();
        Self {
            path,
            users,
            variables,
        }
    }

    fn password_variable(user: &str) -> String {
        format!("JETSOURCE_{}_PASSWORD", user.to_ascii_uppercase())
    }

    /// A worker's NATS user is its role's (jetsource-<role> runs as <role>)
    /// and one accounts.conf defines.
    fn check_user(&self, what: &str, bin: &str, env: &BTreeMap<String, String>) -> String {
        let user = env
            .get("JETSOURCE__NATS__USER")
            .unwrap_or_else(|| panic!("{what}: no JETSOURCE__NATS__USER"));
        assert!(
            self.users.contains(user),
            "{what}: NATS user {user} is not in {} ({:?})",
            self.path.display(),
            self.users
        );
        let role = if bin == CLI {
            Some("client")
        } else {
            bin.strip_prefix("jetsource-")
        };
        assert_eq!(
            Some(user.as_str()),
            role,
            "{what}: {bin} runs as NATS user {user}"
        );
        assert!(
            env.contains_key("JETSOURCE__NATS__PASSWORD"),
            "{what}: no JETSOURCE__NATS__PASSWORD"
        );
        user.clone()
    }

    /// `nats-server -t` accepts `config` (copied with the files beside it
    /// into a directory of their own) with `env` as its environment.
    fn check_server_config(
        &self,
        what: &str,
        files: &[(String, PathBuf)],
        config: &str,
        env: &[(String, String)],
    ) {
        let dir = tempfile::tempdir().unwrap();
        for (name, source) in files {
            std::fs::copy(source, dir.path().join(name))
                .unwrap_or_else(|e| panic!("{what}: {}: {e}", source.display()));
        }
        let names: BTreeSet<&String> = env.iter().map(|(k, _)| k).collect();
        for variable in &self.variables {
            assert!(
                names.contains(variable),
                "{what}: nats-server gets no {variable} (read by {})",
                self.path.display()
            );
        }
        let out = Command::new(nats_server_binary())
            .arg("-t")
            .arg("-c")
            .arg(config)
            .current_dir(dir.path())
            .env_clear()
            .envs(env.iter().cloned())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{what}: nats-server refuses {config}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// The NATS image tag matches the nats-server the tests run (Makefile).
fn check_nats_image_tag(what: &str, tag: &str) {
    let makefile = read(&root().join("Makefile"));
    let version = makefile
        .lines()
        .find_map(|l| l.strip_prefix("NATS_SERVER_VERSION :="))
        .unwrap()
        .trim();
    assert!(
        tag.starts_with(&format!("{version}-")) || tag == version,
        "{what}: nats image {tag}, but the tests run nats-server {version}"
    );
}

/// The Redis ACL users made by `args` (redis-server arguments, ACL part),
/// on a real redis-server: `writer` (the projector's `redis.url`) writes its
/// key spaces and nothing else, `reader` (`redis.query_url`) only reads,
/// and the default user is off.
fn check_redis_acl(
    what: &str,
    args: Vec<String>,
    files: Vec<(String, String)>,
    writer: &str,
    reader: &str,
) {
    let server = RedisServer::start_configured(move |dir, _| {
        for (name, text) in &files {
            std::fs::write(dir.join(name), text).unwrap();
        }
        args.iter()
            .map(|a| a.replace("{dir}", &dir.to_string_lossy()))
            .collect()
    });
    // Host and port of the deployment's URL replaced by the test server's.
    let local = |url: &str| {
        let (scheme, rest) = url.split_once("://").unwrap();
        let (credentials, rest) = rest
            .rsplit_once('@')
            .unwrap_or_else(|| panic!("{what}: {url} has no user"));
        let path = rest.split_once('/').map(|(_, p)| p).unwrap_or("");
        format!(
            "{scheme}://{credentials}@127.0.0.1:{}/{path}",
            server.port()
        )
    };
    let connect = |url: &str| {
        redis::Client::open(local(url))
            .and_then(|c| c.get_connection())
            .unwrap_or_else(|e| panic!("{what}: cannot connect as in {url}: {e}"))
    };
    let run = |con: &mut redis::Connection, args: &[&str]| {
        let mut cmd = redis::cmd(args[0]);
        for a in &args[1..] {
            cmd.arg(*a);
        }
        cmd.query::<redis::Value>(con).map(|_| ())
    };
    let mut writer_con = connect(writer);
    for allowed in [
        &["SET", "jetsource:bank:meta", "1"][..],
        &[
            "HSET",
            "{jetsource:accounts:g1:p0}:account:acc-1",
            "balance",
            "5",
        ],
        &[
            "EVAL",
            "return redis.call('INCR', KEYS[1])",
            "1",
            "jetsource:x",
        ],
        &["SCAN", "0", "MATCH", "{jetsource:accounts:g1:p*"],
        &["UNLINK", "jetsource:x"],
    ] {
        run(&mut writer_con, allowed)
            .unwrap_or_else(|e| panic!("{what}: the projector's user may not {allowed:?}: {e}"));
    }
    for refused in [
        &["SET", "other:key", "1"][..],
        &["FLUSHALL"],
        &["CONFIG", "GET", "*"],
    ] {
        assert!(
            run(&mut writer_con, refused).is_err(),
            "{what}: the projector's user may {refused:?}"
        );
    }
    let mut reader_con = connect(reader);
    for allowed in [
        &["GET", "jetsource:bank:meta"][..],
        &["HGETALL", "{jetsource:accounts:g1:p0}:account:acc-1"],
        &["PING"],
    ] {
        run(&mut reader_con, allowed)
            .unwrap_or_else(|e| panic!("{what}: the query user may not {allowed:?}: {e}"));
    }
    for refused in [
        &["SET", "jetsource:bank:meta", "2"][..],
        &["DEL", "jetsource:bank:meta"],
        &[
            "EVAL",
            "return redis.call('SET', KEYS[1], 'x')",
            "1",
            "jetsource:y",
        ],
        &["GET", "other:key"],
    ] {
        assert!(
            run(&mut reader_con, refused).is_err(),
            "{what}: the query user may {refused:?}"
        );
    }
    let anonymous = redis::Client::open(server.url())
        .and_then(|c| c.get_connection())
        .and_then(|mut con| run(&mut con, &["GET", "jetsource:bank:meta"]));
    assert!(
        anonymous.is_err(),
        "{what}: an anonymous connection reads (the default user must be off)"
    );
    // Not only these commands: the projector itself, writing as `writer` and
    // answering a query as `reader`, works with these users.
    let (writer_url, reader_url) = (local(writer), local(reader));
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (reply, _fleet) = runtime.block_on(jetsource_tests::project_and_query(&[
        ("JETSOURCE__REDIS__URL", writer_url.as_str()),
        ("JETSOURCE__REDIS__QUERY_URL", reader_url.as_str()),
    ]));
    assert_eq!(reply["data"]["balance"], 42, "{what}: {reply}");
}

/// The arguments from the first `--user` on: the ACL part of a
/// redis-server command line.
fn acl_args(what: &str, args: &[String]) -> Vec<String> {
    let start = args
        .iter()
        .position(|a| a == "--user")
        .unwrap_or_else(|| panic!("{what}: redis-server has no --user"));
    args[start..].to_vec()
}

/// Kubernetes: the Secrets of secrets.example.yaml, name -> key -> value.
fn secrets(docs: &[Value]) -> BTreeMap<String, BTreeMap<String, String>> {
    docs.iter()
        .filter(|d| d["kind"] == "Secret")
        .map(|d| {
            let values = d["stringData"]
                .as_object()
                .into_iter()
                .flatten()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_owned()))
                .collect();
            (str_of("Secret", d, "/metadata/name").to_owned(), values)
        })
        .collect()
}

/// A container's environment as Kubernetes gives it: values from
/// Secrets, `$(NAME)` expanded from the variables before.
fn container_env(
    what: &str,
    container: &Value,
    secrets: &BTreeMap<String, BTreeMap<String, String>>,
) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = Vec::new();
    for var in container["env"].as_array().into_iter().flatten() {
        let name = str_of(what, var, "/name").to_owned();
        let value = if let Some(value) = var.get("value") {
            let mut value = value
                .as_str()
                .unwrap_or_else(|| panic!("{what}: {name} is not a string"))
                .to_owned();
            for (before, v) in &env {
                value = value.replace(&format!("$({before})"), v);
            }
            assert!(
                !value.contains("$("),
                "{what}: {name} = {value}: unknown reference"
            );
            value
        } else {
            let secret = str_of(what, var, "/valueFrom/secretKeyRef/name");
            let key = str_of(what, var, "/valueFrom/secretKeyRef/key");
            secrets
                .get(secret)
                .and_then(|s| s.get(key))
                .unwrap_or_else(|| panic!("{what}: {name} from Secret {secret} key {key}, which secrets.example.yaml does not have"))
                .clone()
        };
        env.push((name, value));
    }
    env
}

fn expand(text: &str, env: &[(String, String)]) -> String {
    env.iter().fold(text.to_owned(), |t, (k, v)| {
        t.replace(&format!("$({k})"), v)
    })
}

#[test]
fn deploy_kubernetes_manifests_name_what_the_binaries_read() {
    let app = App::load();
    let accounts = Accounts::load();
    let dir = deploy("kubernetes");
    let kustomization = yaml_docs("kustomization.yaml", &read(&dir.join("kustomization.yaml")));
    let kustomization = &kustomization[0];
    assert_eq!(kustomization["kind"], "Kustomization");
    let namespace = str_of("kustomization.yaml", kustomization, "/namespace");
    let image = kustomization["images"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|i| i["name"] == APP_PACKAGE)
        .expect("kustomization.yaml sets the image's tag");
    assert_eq!(
        image["newTag"].as_str(),
        Some(app.version.as_str()),
        "kustomization.yaml: image tag"
    );
    // The generated ConfigMaps: name -> the files in them.
    let config_maps: BTreeMap<String, Vec<String>> = kustomization["configMapGenerator"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|g| {
            (
                str_of("configMapGenerator", g, "/name").to_owned(),
                strings(&g["files"]),
            )
        })
        .collect();
    for file in config_maps.values().flatten() {
        Config::load(Some(&dir.join(file)))
            .unwrap_or_else(|e| panic!("ConfigMap file {file} does not load: {e}"));
    }
    let resources = strings(&kustomization["resources"]);

    let secrets = secrets(&yaml_docs(
        "secrets.example.yaml",
        &read(&dir.join("secrets.example.yaml")),
    ));
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|f| f.ends_with(".yaml") && f != "kustomization.yaml" && f != "nats-values.yaml")
        .collect();
    files.sort();
    for resource in &resources {
        assert!(
            files.contains(resource),
            "kustomization.yaml: no {resource}"
        );
    }

    let mut docs = Vec::new();
    for file in &files {
        for doc in yaml_docs(file, &read(&dir.join(file))) {
            docs.push((file.clone(), doc));
        }
    }
    let api_versions = BTreeMap::from([
        ("Namespace", "v1"),
        ("Secret", "v1"),
        ("Service", "v1"),
        ("ConfigMap", "v1"),
        ("Deployment", "apps/v1"),
        ("StatefulSet", "apps/v1"),
        ("PodDisruptionBudget", "policy/v1"),
    ]);
    let mut deployments = BTreeMap::new();
    let mut workloads = Vec::new();
    let mut pdbs = Vec::new();
    for (file, doc) in &docs {
        let kind = str_of(file, doc, "/kind");
        let name = str_of(file, doc, "/metadata/name");
        let what = format!("{file}: {kind} {name}");
        let api = api_versions
            .get(kind)
            .unwrap_or_else(|| panic!("{what}: a kind this test does not check"));
        assert_eq!(
            str_of(&what, doc, "/apiVersion"),
            *api,
            "{what}: apiVersion"
        );
        if kind == "Namespace" {
            assert_eq!(name, namespace, "{what}: not the kustomization's namespace");
        }
        if let Some(ns) = doc.pointer("/metadata/namespace") {
            assert_eq!(ns, namespace, "{what}: namespace");
        }
        match kind {
            "Deployment" | "StatefulSet" => workloads.push((what.clone(), doc)),
            "PodDisruptionBudget" => pdbs.push((what.clone(), doc)),
            _ => {}
        }
        if kind == "Deployment" {
            assert!(
                resources.contains(file),
                "{what}: {file} is not in kustomization.yaml"
            );
            deployments.insert(what, doc);
        }
    }

    let mut deployed_bins = BTreeSet::new();
    for (what, doc) in &deployments {
        let spec = &doc["spec"];
        let replicas = spec["replicas"].as_u64().unwrap_or(1);
        assert!((2..=3).contains(&replicas), "{what}: {replicas} replicas");
        let selector = &spec["selector"]["matchLabels"];
        let labels = &spec["template"]["metadata"]["labels"];
        for (k, v) in selector
            .as_object()
            .unwrap_or_else(|| panic!("{what}: no selector"))
        {
            assert_eq!(
                &labels[k], v,
                "{what}: the selector does not match the pods' labels"
            );
        }
        let pod = &spec["template"]["spec"];
        let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap_or(30);
        assert!(
            grace >= MIN_GRACE_SECS,
            "{what}: terminationGracePeriodSeconds {grace}"
        );
        assert_eq!(
            pod["securityContext"]["runAsNonRoot"], true,
            "{what}: runAsNonRoot"
        );
        let containers = pod["containers"].as_array().unwrap();
        assert_eq!(containers.len(), 1, "{what}: one container");
        let container = &containers[0];
        assert_eq!(
            container["image"].as_str(),
            Some(app.image().as_str()),
            "{what}: image"
        );
        let mut argv = strings(&container["command"]);
        argv.extend(strings(&container["args"]));
        let (bin, flag_config) = app.command_line(what, &argv);
        deployed_bins.insert(bin.clone());

        let security = &container["securityContext"];
        assert_eq!(
            security["allowPrivilegeEscalation"], false,
            "{what}: allowPrivilegeEscalation"
        );
        assert_eq!(
            security["readOnlyRootFilesystem"], true,
            "{what}: readOnlyRootFilesystem"
        );
        assert!(
            strings(&security["capabilities"]["drop"]).contains(&"ALL".to_owned()),
            "{what}: capabilities must drop ALL"
        );
        let resources = &container["resources"];
        for pointer in ["/requests/cpu", "/requests/memory", "/limits/memory"] {
            assert!(
                resources.pointer(pointer).is_some(),
                "{what}: resources{pointer}"
            );
        }

        let env = container_env(what, container, &secrets);
        let env_map: BTreeMap<String, String> = env.iter().cloned().collect();
        let used = serde_json::to_string(container).unwrap();
        // The configuration file: --config or JETSOURCE_CONFIG, a path in a
        // mounted ConfigMap of the kustomization.
        let config_path = flag_config
            .or_else(|| env_map.get("JETSOURCE_CONFIG").cloned())
            .unwrap_or_else(|| panic!("{what}: no --config or JETSOURCE_CONFIG"));
        let mount = container["volumeMounts"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|m| config_path.starts_with(&format!("{}/", str_of(what, m, "/mountPath"))))
            .unwrap_or_else(|| panic!("{what}: {config_path} is in no volume"));
        let volume = pod["volumes"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|v| v["name"] == mount["name"])
            .unwrap();
        let config_map = str_of(what, volume, "/configMap/name");
        let file_name = &config_path[str_of(what, mount, "/mountPath").len() + 1..];
        assert!(
            config_maps
                .get(config_map)
                .is_some_and(|f| f.iter().any(|f| f == file_name)),
            "{what}: {config_path}: ConfigMap {config_map} has no {file_name}"
        );
        check_config(what, Some(&dir.join(file_name)), &env, &used);

        // Probes on the HTTP listener.
        let listen = env_map
            .get("JETSOURCE__HTTP__LISTEN")
            .unwrap_or_else(|| panic!("{what}: no JETSOURCE__HTTP__LISTEN"));
        let port: u64 = listen.rsplit(':').next().unwrap().parse().unwrap();
        assert!(
            listen.starts_with("0.0.0.0:"),
            "{what}: probes cannot reach {listen}"
        );
        let port_names: BTreeMap<String, u64> = container["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| {
                (
                    p["name"].as_str().unwrap_or("").to_owned(),
                    p["containerPort"].as_u64().unwrap(),
                )
            })
            .collect();
        for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
            let get = &container[probe]["httpGet"];
            assert_eq!(get["path"], path, "{what}: {probe}");
            let probe_port = match &get["port"] {
                Value::String(name) => *port_names
                    .get(name)
                    .unwrap_or_else(|| panic!("{what}: no port {name}")),
                other => other.as_u64().unwrap(),
            };
            assert_eq!(
                probe_port, port,
                "{what}: {probe} on {probe_port}, listener on {listen}"
            );
        }

        // NATS role: its user, its password from the key the servers read.
        let user = accounts.check_user(what, &bin, &env_map);
        let password = container["env"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == "JETSOURCE__NATS__PASSWORD")
            .unwrap();
        assert_eq!(
            str_of(what, password, "/valueFrom/secretKeyRef/key"),
            Accounts::password_variable(&user),
            "{what}: NATS password"
        );
    }
    assert_eq!(
        deployed_bins,
        app.workers(),
        "a Deployment per worker binary"
    );

    for (what, doc) in &pdbs {
        assert_eq!(doc["spec"]["minAvailable"], 1, "{what}: minAvailable");
        let selector = &doc["spec"]["selector"]["matchLabels"];
        assert!(
            deployments
                .values()
                .any(|d| &d["spec"]["selector"]["matchLabels"] == selector),
            "{what}: selects no Deployment's pods"
        );
    }
    for (what, doc) in &deployments {
        let selector = &doc["spec"]["selector"]["matchLabels"];
        assert!(
            pdbs.iter()
                .any(|(_, p)| &p["spec"]["selector"]["matchLabels"] == selector),
            "{what}: no PodDisruptionBudget"
        );
    }
    for (file, doc) in docs.iter().filter(|(_, d)| d["kind"] == "Service") {
        let selector = doc["spec"]["selector"].as_object().unwrap();
        assert!(
            workloads.iter().any(|(_, w)| selector
                .iter()
                .all(|(k, v)| &w["spec"]["template"]["metadata"]["labels"][k] == v)),
            "{file}: Service selects no workload"
        );
    }

    // Redis: its ACL users let the projector's URLs do what they must.
    let (what, redis) = workloads
        .iter()
        .find(|(_, w)| w["kind"] == "StatefulSet" && w["metadata"]["name"] == "redis")
        .expect("redis.yaml: StatefulSet redis");
    let container = &redis["spec"]["template"]["spec"]["containers"][0];
    let env = container_env(what, container, &secrets);
    let args: Vec<String> = strings(&container["args"])
        .iter()
        .map(|a| expand(a, &env))
        .collect();
    let (_, projector) = deployments
        .iter()
        .find(|(_, d)| d["metadata"]["name"] == "jetsource-projector")
        .expect("a projector Deployment");
    let projector_env: BTreeMap<String, String> = container_env(
        "projector",
        &projector["spec"]["template"]["spec"]["containers"][0],
        &secrets,
    )
    .into_iter()
    .collect();
    check_redis_acl(
        what,
        acl_args(what, &args),
        vec![],
        &projector_env["JETSOURCE__REDIS__URL"],
        &projector_env["JETSOURCE__REDIS__QUERY_URL"],
    );
}

#[test]
fn deploy_nats_helm_values_make_a_synced_three_node_cluster_with_the_roles() {
    let accounts = Accounts::load();
    let what = "nats-values.yaml";
    let values = yaml_docs(what, &read(&deploy("kubernetes/nats-values.yaml")));
    let values = &values[0];
    let config = &values["config"];
    assert_eq!(config["cluster"]["enabled"], true, "{what}: cluster");
    assert_eq!(config["cluster"]["replicas"], 3, "{what}: 3 nodes");
    assert_eq!(config["jetstream"]["enabled"], true, "{what}: JetStream");
    assert_eq!(
        config["jetstream"]["fileStore"]["enabled"], true,
        "{what}: file storage"
    );
    assert_eq!(
        config["jetstream"]["merge"]["sync_interval"], "always",
        "{what}: sync_interval"
    );
    assert!(config["nats"]["tls"].is_object(), "{what}: a TLS block");
    let include = str_of(what, config, "/merge/$include");
    assert!(
        include.ends_with("/accounts.conf"),
        "{what}: includes {include}"
    );
    check_nats_image_tag(what, str_of(what, values, "/container/image/tag"));
    // accounts.conf mounted where the include points (relative to
    // /etc/nats-config/nats.conf).
    let included = Path::new("/etc/nats-config").join(include);
    let mounts: Vec<&Value> = values["container"]["patch"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["path"] == "/volumeMounts/-")
        .collect();
    let mount = mounts
        .iter()
        .find(|m| {
            let dir = Path::new(m["value"]["mountPath"].as_str().unwrap_or("/nowhere"));
            included.parent().is_some_and(|p| normalize(p) == dir)
        })
        .unwrap_or_else(|| panic!("{what}: no volume mounted at {}", included.display()));
    let volume_name = &mount["value"]["name"];
    assert!(
        values["podTemplate"]["patch"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|p| &p["value"]["name"] == volume_name
                && p["value"]["configMap"]["name"].is_string()),
        "{what}: no ConfigMap volume {volume_name}"
    );
    // Every password variable accounts.conf reads comes from the Secret
    // the workers read theirs from.
    let secrets = secrets(&yaml_docs(
        "secrets.example.yaml",
        &read(&deploy("kubernetes/secrets.example.yaml")),
    ));
    let env = values["container"]["env"]
        .as_object()
        .expect("container.env");
    for variable in &accounts.variables {
        let var = env.get(variable).unwrap_or_else(|| {
            panic!("{what}: container.env has no {variable} (nats/accounts.conf reads it)")
        });
        let secret = str_of(what, var, "/valueFrom/secretKeyRef/name");
        let key = str_of(what, var, "/valueFrom/secretKeyRef/key");
        assert!(
            secrets.get(secret).is_some_and(|s| s.contains_key(key)),
            "{what}: {variable} from Secret {secret} key {key}, not in secrets.example.yaml"
        );
    }
}

/// `/etc/a/../b` as `/etc/b`.
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            std::path::Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

/// Compose interpolation (`${NAME}`, `${NAME:?message}`, `${NAME:-default}`)
/// with a distinct URL-safe value for every variable; returns the text and
/// the values.
fn interpolate(text: &str) -> (String, BTreeMap<String, String>) {
    let mut values = BTreeMap::new();
    let mut out = String::new();
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let end = rest[start..].find('}').unwrap() + start;
        let inner = &rest[start + 2..end];
        let name_end = inner.find([':', '-', '?']).unwrap_or(inner.len());
        let name = &inner[..name_end];
        let n = values.len();
        let value = values
            .entry(name.to_owned())
            .or_insert_with(|| format!("pw{n}x{}", name.len()))
            .clone();
        out.push_str(&value);
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    (out, values)
}

fn compose_env(what: &str, service: &Value) -> Vec<(String, String)> {
    match &service["environment"] {
        Value::Object(map) => map
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    v.as_str()
                        .map(str::to_owned)
                        .unwrap_or_else(|| v.to_string()),
                )
            })
            .collect(),
        Value::Array(list) => list
            .iter()
            .map(|kv| {
                let (k, v) = kv
                    .as_str()
                    .and_then(|s| s.split_once('='))
                    .unwrap_or_else(|| panic!("{what}: {kv}"));
                (k.to_owned(), v.to_owned())
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// Compose volumes `source:target[:mode]`: target -> source on this host.
fn compose_mounts(dir: &Path, service: &Value) -> BTreeMap<String, PathBuf> {
    strings(&service["volumes"])
        .iter()
        .filter_map(|v| {
            let mut parts = v.split(':');
            let source = parts.next()?;
            let target = parts.next()?;
            source
                .starts_with('.')
                .then(|| (target.to_owned(), dir.join(source)))
        })
        .collect()
}

fn seconds(what: &str, duration: &str) -> u64 {
    duration
        .strip_suffix('s')
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{what}: duration {duration:?}"))
}

#[test]
fn deploy_compose_trial_names_what_the_binaries_read() {
    let app = App::load();
    let accounts = Accounts::load();
    let dir = deploy("compose");
    let (text, variables) = interpolate(&read(&dir.join("compose.yaml")));
    let compose = yaml_docs("compose.yaml", &text);
    let services = compose[0]["services"]
        .as_object()
        .expect("compose.yaml: services");
    let nats = &services["nats"];
    let nats_env = compose_env("nats", nats);
    let mut workers = BTreeSet::new();
    let mut projector_env = BTreeMap::new();
    for (name, service) in services {
        let what = format!("compose.yaml: service {name}");
        let image = str_of(&what, service, "/image");
        if name == "nats" || name == "redis" {
            assert!(
                service["healthcheck"]["test"].is_array(),
                "{what}: healthcheck"
            );
            continue;
        }
        assert_eq!(image, app.image(), "{what}: image");
        assert_eq!(service["read_only"], true, "{what}: read_only");
        assert!(
            strings(&service["cap_drop"]).contains(&"ALL".to_owned()),
            "{what}: cap_drop ALL"
        );
        let mut argv = strings(&service["entrypoint"]);
        argv.extend(strings(&service["command"]));
        let (bin, config) = app.command_line(&what, &argv);
        let env = compose_env(&what, service);
        let env_map: BTreeMap<String, String> = env.iter().cloned().collect();
        let config = config
            .or_else(|| env_map.get("JETSOURCE_CONFIG").cloned())
            .unwrap_or_else(|| panic!("{what}: no --config"));
        let mounts = compose_mounts(&dir, service);
        let file = mounts
            .get(&config)
            .unwrap_or_else(|| panic!("{what}: {config} is not mounted from a file here"));
        check_config(&what, Some(file), &env, "");
        accounts.check_user(&what, &bin, &env_map);
        if bin == CLI {
            continue;
        }
        workers.insert(bin.clone());
        let build = &service["build"];
        assert_eq!(
            normalize(&dir.join(str_of(&what, build, "/context"))),
            normalize(&root()),
            "{what}: build context"
        );
        assert_eq!(str_of(&what, build, "/dockerfile"), "deploy/Dockerfile");
        let grace = seconds(&what, str_of(&what, service, "/stop_grace_period"));
        assert!(
            grace >= MIN_GRACE_SECS,
            "{what}: stop_grace_period {grace}s"
        );
        let listen = &env_map["JETSOURCE__HTTP__LISTEN"];
        let port = listen.rsplit(':').next().unwrap();
        let health = strings(&service["healthcheck"]["test"]).join(" ");
        assert!(
            health.contains(&format!(":{port}/readyz")),
            "{what}: healthcheck {health:?} is not GET /readyz on {listen}"
        );
        // The password is the one the NATS server gets for this user.
        let user = &env_map["JETSOURCE__NATS__USER"];
        let server_password = nats_env
            .iter()
            .find(|(k, _)| *k == Accounts::password_variable(user))
            .map(|(_, v)| v);
        assert_eq!(
            server_password,
            env_map.get("JETSOURCE__NATS__PASSWORD"),
            "{what}: NATS password differs from the server's"
        );
        if bin == "jetsource-projector" {
            projector_env = env_map;
        }
    }
    assert_eq!(
        workers,
        app.workers(),
        "compose.yaml: a service per worker binary"
    );

    // nats-server accepts its configuration, accounts.conf included.
    check_nats_image_tag(
        "compose.yaml",
        str_of("nats", nats, "/image").rsplit(':').next().unwrap(),
    );
    let args = strings(&nats["command"]);
    let config = &args[args.iter().position(|a| a == "-c").expect("nats: -c") + 1];
    let config_dir = Path::new(config).parent().unwrap();
    let files: Vec<(String, PathBuf)> = compose_mounts(&dir, nats)
        .into_iter()
        .filter(|(target, _)| Path::new(target).parent() == Some(config_dir))
        .map(|(target, source)| {
            (
                Path::new(&target)
                    .file_name()
                    .unwrap()
                    .to_string_lossy()
                    .into_owned(),
                source,
            )
        })
        .collect();
    let name = Path::new(config)
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    assert!(
        files.iter().any(|(n, _)| *n == name),
        "nats: {config} not mounted"
    );
    accounts.check_server_config("compose.yaml: nats", &files, &name, &nats_env);

    // Redis: its ACL users let the projector's URLs do what they must.
    let redis_args = strings(&services["redis"]["command"]);
    check_redis_acl(
        "compose.yaml: redis",
        acl_args("compose.yaml: redis", &redis_args),
        vec![],
        &projector_env["JETSOURCE__REDIS__URL"],
        &projector_env["JETSOURCE__REDIS__QUERY_URL"],
    );
    // make-env.sh writes every variable compose.yaml needs.
    let make_env = read(&dir.join("make-env.sh"));
    for variable in variables.keys() {
        assert!(
            make_env.contains(variable),
            "make-env.sh does not write {variable}"
        );
    }
}

/// A systemd unit: section -> (key, value) in order.
fn parse_unit(what: &str, text: &str) -> BTreeMap<String, Vec<(String, String)>> {
    let mut sections: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    let mut current = None;
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(section) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            assert!(
                ["Unit", "Service", "Install"].contains(&section),
                "{what}:{}: unknown section [{section}]",
                n + 1
            );
            sections.entry(section.to_owned()).or_default();
            current = Some(section.to_owned());
            continue;
        }
        let (key, value) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("{what}:{}: not key=value: {line}", n + 1));
        let section = current
            .as_ref()
            .unwrap_or_else(|| panic!("{what}:{}: outside a section", n + 1));
        assert!(
            !key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric()),
            "{what}:{}: key {key:?}",
            n + 1
        );
        sections
            .get_mut(section)
            .unwrap()
            .push((key.to_owned(), value.to_owned()));
    }
    sections
}

/// `KEY=VALUE` lines of an environment file.
fn env_file(what: &str, path: &Path) -> Vec<(String, String)> {
    read(path)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (k, v) = l.split_once('=').unwrap_or_else(|| panic!("{what}: {l}"));
            (k.to_owned(), v.to_owned())
        })
        .collect()
}

/// The file under deploy/systemd/ a path on the host stands for: its name,
/// or its name with `.example`.
fn systemd_file(what: &str, host_path: &str) -> PathBuf {
    let name = Path::new(host_path)
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let dir = deploy("systemd");
    [dir.join(&name), dir.join(format!("{name}.example"))]
        .into_iter()
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("{what}: deploy/systemd has no {name} (or {name}.example)"))
}

#[test]
fn deploy_systemd_units_are_hardened_and_name_what_the_binaries_read() {
    let app = App::load();
    let accounts = Accounts::load();
    let dir = deploy("systemd");
    let mut units = BTreeSet::new();
    let mut projector_env = BTreeMap::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let file = path.file_name().unwrap().to_string_lossy().into_owned();
        if !file.ends_with(".service") {
            continue;
        }
        let what = format!("deploy/systemd/{file}");
        let unit = parse_unit(&what, &read(&path));
        for section in ["Unit", "Service", "Install"] {
            assert!(unit.contains_key(section), "{what}: no [{section}]");
        }
        let service = &unit["Service"];
        let get = |key: &str| -> Vec<&str> {
            service
                .iter()
                .filter(|(k, _)| k == key)
                .map(|(_, v)| v.as_str())
                .collect()
        };
        let one = |key: &str| -> &str {
            get(key)
                .last()
                .copied()
                .unwrap_or_else(|| panic!("{what}: no {key}="))
        };
        assert_eq!(one("Restart"), "on-failure", "{what}: Restart");
        for (key, value) in [
            ("NoNewPrivileges", "yes"),
            ("ProtectSystem", "strict"),
            ("ProtectHome", "yes"),
            ("PrivateTmp", "yes"),
            ("CapabilityBoundingSet", ""),
        ] {
            assert_eq!(one(key), value, "{what}: {key}");
        }
        let families: BTreeSet<&str> = one("RestrictAddressFamilies").split_whitespace().collect();
        assert_eq!(
            families,
            BTreeSet::from(["AF_INET", "AF_INET6", "AF_UNIX"]),
            "{what}"
        );
        assert!(
            get("DynamicUser") == ["yes"] || !get("User").is_empty(),
            "{what}: DynamicUser=yes or User="
        );
        let exec: Vec<String> = one("ExecStart")
            .split_whitespace()
            .map(str::to_owned)
            .collect();
        let environment_file = one("EnvironmentFile");
        let mut env = env_file(
            &what,
            &systemd_file(&what, environment_file.trim_start_matches('-')),
        );
        if file == "nats-server.service" {
            assert!(exec[0].ends_with("/nats-server"), "{what}: {exec:?}");
            let config = &exec[exec.iter().position(|a| a == "-c").expect("-c") + 1];
            let files = vec![
                ("nats-server.conf".to_owned(), systemd_file(&what, config)),
                ("accounts.conf".to_owned(), accounts.path.clone()),
            ];
            accounts.check_server_config(&what, &files, "nats-server.conf", &env);
            continue;
        }
        let stop = seconds(
            &what,
            &format!("{}s", one("TimeoutStopSec").trim_end_matches('s')),
        );
        assert!(stop >= MIN_GRACE_SECS, "{what}: TimeoutStopSec {stop}");
        let (bin, config) = app.command_line(&what, &exec);
        assert_eq!(file, format!("{bin}.service"), "{what}: runs {bin}");
        for value in get("Environment") {
            for assignment in value.split_whitespace() {
                let (k, v) = assignment
                    .split_once('=')
                    .unwrap_or_else(|| panic!("{what}: {value}"));
                env.push((k.to_owned(), v.to_owned()));
            }
        }
        let config = config.unwrap_or_else(|| panic!("{what}: no --config"));
        check_config(&what, Some(&systemd_file(&what, &config)), &env, "");
        let env_map: BTreeMap<String, String> = env.into_iter().collect();
        accounts.check_user(&what, &bin, &env_map);
        if bin == "jetsource-projector" {
            projector_env = env_map;
        }
        units.insert(bin);
    }
    assert_eq!(units, app.workers(), "a unit per worker binary");
    let acl = read(&dir.join("redis-users.acl.example"));
    check_redis_acl(
        "deploy/systemd/redis-users.acl.example",
        vec!["--aclfile".into(), "{dir}/users.acl".into()],
        vec![("users.acl".into(), acl)],
        &projector_env["JETSOURCE__REDIS__URL"],
        &projector_env["JETSOURCE__REDIS__QUERY_URL"],
    );
}

#[test]
fn deploy_dockerfile_builds_every_binary_and_the_readme_names_every_file() {
    let app = App::load();
    let what = "deploy/Dockerfile";
    let dockerfile = read(&deploy("Dockerfile"));
    assert!(
        dockerfile.contains(&format!("ARG APP_PACKAGE={APP_PACKAGE}\n")),
        "{what}: builds another package"
    );
    assert!(
        dockerfile.contains(&format!("-t {}", app.image())),
        "{what}: names the image {}",
        app.image()
    );
    for bin in &app.bins {
        let copied = dockerfile
            .match_indices(&format!("target/release/{bin}"))
            .any(|(i, m)| {
                !dockerfile[i + m.len()..]
                    .starts_with(|c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            });
        assert!(copied, "{what}: does not copy {bin}");
    }
    let last_stage = &dockerfile[dockerfile.rfind("\nFROM ").unwrap()..];
    let user = last_stage
        .lines()
        .find_map(|l| l.strip_prefix("USER "))
        .unwrap_or_else(|| panic!("{what}: runs as root"));
    assert!(
        !["root", "0", "0:0"].contains(&user.trim()),
        "{what}: USER {user}"
    );
    let mut env = Vec::new();
    for line in last_stage.lines() {
        if let Some(assignment) = line.strip_prefix("ENV ") {
            let (k, v) = assignment.split_once('=').unwrap();
            env.push((k.to_owned(), v.to_owned()));
        }
        if let Some(cmd) = line.strip_prefix("CMD ") {
            let argv: Vec<String> = serde_json::from_str(cmd).unwrap();
            app.command_line(what, &argv);
        }
    }
    check_config(what, None, &env, "");

    let readme = read(&deploy("README.md"));
    let mut stack = vec![deploy("")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            assert!(
                name == "README.md" || readme.contains(&name),
                "deploy/README.md does not mention {}",
                path.display()
            );
        }
    }
    assert!(
        readme.contains(&app.image()),
        "deploy/README.md: the image name"
    );
    assert!(
        read(&root().join("README.md")).contains("deploy/README.md"),
        "README.md points at deploy/README.md"
    );
}
