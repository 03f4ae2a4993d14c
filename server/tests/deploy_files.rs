//! The files in `deploy/` stay usable: every sample config parses as a `ServerConfig` (unknown
//! keys are an error there) with the values its comments promise, every systemd unit's
//! `ExecStart` is a command line the binary accepts, and `local-cluster.sh` is valid bash.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use im_c2s::C2sConfig;
use im_server::ServerConfig;

fn deploy(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(rel)
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(deploy(rel)).unwrap_or_else(|e| panic!("deploy/{rel}: {e}"))
}

/// Parses a sample exactly as `im-server --config` does.
fn parse(rel: &str) -> ServerConfig {
    toml::from_str(&read(rel)).unwrap_or_else(|e| panic!("deploy/{rel}: {e}"))
}

/// The file's top-level keys (tables included).
fn top_keys(rel: &str) -> BTreeSet<String> {
    let v: toml::Table = toml::from_str(&read(rel)).unwrap();
    v.keys().cloned().collect()
}

fn raw_int(rel: &str, key: &str) -> Option<i64> {
    let v: toml::Table = toml::from_str(&read(rel)).unwrap();
    v.get(key).and_then(toml::Value::as_integer)
}

/// Keys a gate process reads (`gate_config` in server/src/config.rs).
const GATE_KEYS: &[&str] = &[
    "listen",
    "gate_cores",
    "max_body",
    "max_login_body",
    "max_inflight",
    "max_down_backlog",
    "max_link_queued",
    "login_timeout_secs",
    "idle_timeout_secs",
    "max_write_queue",
    "limits",
    "ws_listen",
    "web_root",
    "ws_origins",
    "tcp_tls",
    "ws_tls",
    "status_listen",
];

/// Keys a logic node reads (`logic_config`, `start_logic` and the services).
const LOGIC_KEYS: &[&str] = &[
    "data_dir",
    "logic_workers",
    "token_secret",
    "heartbeat_secs",
    "seq_segment",
    "max_queued",
    "max_worker_backlog",
    "handoff_linger_us",
    "max_cached_users",
    "max_cache_bytes",
    "max_cached_groups",
    "peer_queue_bytes",
    "gate_link_queue_bytes",
    "redis_nodes",
    "recall_window_secs",
    "presence_offline_delay_ms",
    "large_group_threshold",
    "max_group_members",
    "large_group_posts_per_sec",
    "large_group_mention_all_secs",
    "org_visibility",
    "scylla_nodes",
    "scylla_keyspace",
    "shard_lease_ms",
    "api",
    "c2s",
    "push",
];

#[test]
fn single_node_sample_parses_at_the_defaults() {
    let cfg = parse("im-server.toml");
    let def = ServerConfig::default();
    assert_eq!(cfg.listen, def.listen);
    assert_eq!(cfg.data_dir, def.data_dir);
    assert_eq!(cfg.max_body, def.max_body);
    assert_eq!(cfg.idle_timeout_secs, def.idle_timeout_secs);
    assert_eq!(cfg.max_write_queue, def.max_write_queue);
    assert_eq!(
        cfg.token_secret, def.token_secret,
        "no secret in the sample"
    );
    assert_eq!(
        cfg.api.as_ref().map(|a| a.listen),
        def.api.as_ref().map(|a| a.listen)
    );
    assert!(matches!(cfg.c2s, Some(C2sConfig::Embedded { .. })));
    assert_eq!(cfg.limits.max_connections, 1_000_000);
    assert_eq!(raw_int("im-server.toml", "shard_lease_ms"), Some(10_000));
}

#[test]
fn gate_sample_parses_and_holds_only_gate_keys() {
    let cfg = parse("im-gate.toml");
    assert_eq!(cfg.listen, "10.0.2.1:7000".parse().unwrap());
    assert_eq!(cfg.status_listen, Some("127.0.0.1:9100".parse().unwrap()));
    assert_eq!(cfg.gate_cores, 0);
    assert_eq!(cfg.idle_timeout_secs, 90);
    assert_eq!(cfg.max_link_queued, ServerConfig::default().max_link_queued);
    assert_eq!(cfg.limits.max_connections, 1_000_000);
    assert_eq!(
        cfg.token_secret,
        im_server::DEV_TOKEN_SECRET,
        "no secret in the sample"
    );
    for k in top_keys("im-gate.toml") {
        assert!(
            GATE_KEYS.contains(&k.as_str()),
            "im-gate.toml: {k} is not a gate key"
        );
    }
}

#[test]
fn logic_sample_parses_and_holds_only_logic_keys() {
    let cfg = parse("im-logic.toml");
    assert_eq!(cfg.redis_nodes.len(), 3);
    assert!(cfg.redis_nodes.iter().all(|n| n.starts_with("redis://")));
    assert_eq!(cfg.scylla_nodes.len(), 3);
    assert_eq!(cfg.scylla_keyspace, "im");
    assert_eq!(cfg.data_dir, Path::new("data"));
    assert!(cfg.logic_workers > 0, "an explicit, equal worker count");
    assert_eq!(
        cfg.token_secret,
        im_server::DEV_TOKEN_SECRET,
        "no secret in the sample"
    );
    let api = cfg.api.as_ref().expect("[api]");
    assert_eq!(api.listen, "10.0.1.1:8080".parse().unwrap());
    assert!(api.keys.is_empty(), "no API key in the sample");
    match &cfg.c2s {
        Some(C2sConfig::RedisStreams { nodes, maxlen }) => {
            assert_eq!(nodes, &cfg.redis_nodes);
            assert_eq!(*maxlen, Some(1_000_000));
        }
        other => panic!("[c2s] should be redis_streams: {other:?}"),
    }
    assert!(cfg.push.is_none());
    assert_eq!(raw_int("im-logic.toml", "shard_lease_ms"), Some(10_000));
    for k in top_keys("im-logic.toml") {
        assert!(
            LOGIC_KEYS.contains(&k.as_str()),
            "im-logic.toml: {k} is not a logic key"
        );
    }
}

/// `Key=value` lines of a unit file (comments skipped; a key may repeat).
fn unit_values(text: &str, key: &str) -> Vec<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .map(str::to_owned)
        .collect()
}

#[test]
fn systemd_units_run_existing_subcommands_with_their_sample_configs() {
    let units = [
        ("systemd/im-server.service", "run", "im-server.toml"),
        ("systemd/im-gate.service", "gate", "im-gate.toml"),
        ("systemd/im-logic.service", "logic", "im-logic.toml"),
    ];
    for (unit, sub, sample) in units {
        let text = read(unit);
        let exec = unit_values(&text, "ExecStart");
        assert_eq!(exec.len(), 1, "{unit}: one ExecStart");
        let argv: Vec<&str> = exec[0].split_whitespace().collect();
        assert_eq!(argv[0], "/usr/local/bin/im-server", "{unit}");
        assert_eq!(argv[1], sub, "{unit}");
        let config = argv
            .windows(2)
            .find(|w| w[0] == "--config")
            .map(|w| w[1])
            .unwrap_or_else(|| panic!("{unit}: no --config"));
        assert_eq!(config, format!("/etc/im/{sample}"), "{unit}");
        assert!(deploy(sample).is_file(), "{unit}: deploy/{sample} missing");
        // The binary accepts the unit's arguments (clap answers --help before checking that
        // required values such as the gate id are present).
        let out = Command::new(env!("CARGO_BIN_EXE_im-server"))
            .args(&argv[1..])
            .arg("--help")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{unit}: `im-server {} --help` failed: {}",
            argv[1..].join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(unit_values(&text, "User"), ["im"], "{unit}");
        assert_eq!(unit_values(&text, "NoNewPrivileges"), ["yes"], "{unit}");
        assert_eq!(unit_values(&text, "ProtectSystem"), ["strict"], "{unit}");
        assert_eq!(unit_values(&text, "EnvironmentFile").len(), 1, "{unit}");
        assert!(!unit_values(&text, "LimitNOFILE").is_empty(), "{unit}");
    }
    let gate = read("systemd/im-gate.service");
    assert_eq!(unit_values(&gate, "LimitNOFILE"), ["1048576"]);
    assert_eq!(
        unit_values(&gate, "EnvironmentFile"),
        ["/etc/im/im-gate.env"]
    );
    let logic = read("systemd/im-logic.service");
    // A fenced logic node exits with code 75 by design and must come back.
    assert_eq!(unit_values(&logic, "Restart"), ["always"]);
    assert_eq!(
        unit_values(&logic, "EnvironmentFile"),
        ["/etc/im/im-logic.env"]
    );
    assert_eq!(unit_values(&logic, "ReadWritePaths"), ["/var/lib/im"]);
}

#[test]
fn local_cluster_script_is_valid_bash() {
    let script = deploy("local-cluster.sh");
    let out = Command::new("bash")
        .arg("-n")
        .arg(&script)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "bash -n: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // shellcheck is optional (CI does not install it); when present, the script must be clean.
    match Command::new("shellcheck").arg(&script).output() {
        Ok(out) => assert!(
            out.status.success(),
            "shellcheck:\n{}",
            String::from_utf8_lossy(&out.stdout)
        ),
        Err(_) => println!("shellcheck not installed: only `bash -n` checked"),
    }
}

/// Every metric the alert rules (deploy/prometheus/im-alerts.yml) and the Grafana dashboard
/// (deploy/grafana/im-dashboard.json) use is one a running server exports: a renamed metric cannot
/// leave an alert that never fires or a panel that stays empty.
#[test]
fn the_alert_rules_and_the_dashboard_use_only_metrics_the_server_exports() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.path().to_path_buf(),
        gate_cores: 1,
        logic_workers: 1,
        api: Some(im_api::ApiConfig::new("127.0.0.1:0".parse().unwrap())),
        ..ServerConfig::default()
    };
    let server = im_server::start(&cfg).unwrap();
    let r = im_testkit::http::http(server.api_addr().unwrap(), "GET", "/metrics", &[], b"");
    assert_eq!(r.status, 200);
    let exported: BTreeSet<String> = r
        .text()
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect();
    server.shutdown();
    // The metric names in a text: `im_…` and `process_…` words (histogram series by their base).
    let used = |text: &str| {
        let mut used = BTreeSet::new();
        for prefix in ["im_", "process_"] {
            for (i, _) in text.match_indices(prefix) {
                let before = text[..i].chars().last();
                if before.is_some_and(|c| c.is_ascii_alphanumeric() || "_/-.".contains(c)) {
                    continue; // inside another word or a path
                }
                let name: String = text[i..]
                    .chars()
                    .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
                    .collect();
                let base = ["_bucket", "_count", "_sum"]
                    .iter()
                    .find_map(|s| name.strip_suffix(s))
                    .unwrap_or(&name)
                    .to_owned();
                used.insert(base);
            }
        }
        used
    };
    let dashboard = read("grafana/im-dashboard.json");
    let d: serde_json::Value = serde_json::from_str(&dashboard).expect("the dashboard is JSON");
    let exprs: Vec<&str> = d["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .flat_map(|p| p["targets"].as_array().expect("targets").iter())
        .map(|t| t["expr"].as_str().expect("expr"))
        .collect();
    assert!(exprs.len() >= 16, "{exprs:?}");
    for (file, names) in [
        (
            "prometheus/im-alerts.yml",
            used(&read("prometheus/im-alerts.yml")),
        ),
        ("grafana/im-dashboard.json", used(&exprs.join("\n"))),
    ] {
        assert!(names.len() >= 8, "{file}: {names:?}");
        let missing: Vec<_> = names.difference(&exported).collect();
        assert!(
            missing.is_empty(),
            "{file} uses metrics the server does not export: {missing:?}"
        );
    }
}

/// `promtool check rules` and `promtool test rules` (deploy/prometheus/im-alerts.test.yml: each
/// alert fires on its series). Skipped without promtool unless `IM_PROMTOOL_TESTS=1` (CI sets it
/// and installs Debian's prometheus package).
#[test]
fn the_alert_rules_pass_promtool() {
    let required = std::env::var("IM_PROMTOOL_TESTS").is_ok_and(|v| v == "1");
    if Command::new("promtool").arg("--version").output().is_err() {
        assert!(
            !required,
            "IM_PROMTOOL_TESTS=1 but promtool is not installed"
        );
        eprintln!("skipped: promtool not installed (IM_PROMTOOL_TESTS=1 makes this a failure)");
        return;
    }
    for (sub, file) in [("check", "im-alerts.yml"), ("test", "im-alerts.test.yml")] {
        let out = Command::new("promtool")
            .args([sub, "rules", file])
            .current_dir(deploy("prometheus"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "promtool {sub} rules {file}:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// `im-server check-config` (issue 19): exit 0 with the warnings for a usable configuration, exit 1
/// naming the listener that another process holds, and a clear error for an unknown key.
#[test]
fn check_config_names_what_would_stop_a_start() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_im-server"))
            .arg("check-config")
            .args(args)
            .arg("--data-dir")
            .arg(&data)
            .env_remove("RUST_BACKTRACE")
            .env_remove("RUST_LIB_BACKTRACE")
            .output()
            .unwrap()
    };
    let out = run(&["--listen", "127.0.0.1:0", "--api-listen", "127.0.0.1:0"]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("warning  token_secret is the public development secret"),
        "{text}"
    );
    assert!(!data.exists(), "a check creates nothing");

    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = run(&["--listen", &addr, "--api-listen", "127.0.0.1:0"]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains(&format!("error    listen {addr} is already in use")),
        "{text}"
    );

    let cfg = dir.path().join("bad.toml");
    std::fs::write(&cfg, "listne = \"127.0.0.1:7000\"\n").unwrap();
    let out = run(&["--config", cfg.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unknown field `listne`"), "{err}");
}
