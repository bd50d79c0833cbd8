//! The deployment files as their consumers read them: the Kubernetes manifests
//! parse and hold what the agent needs (and the agent accepts the arguments
//! they give it), and the Grafana dashboard is a well-formed dashboard whose
//! panels all query something. (That every metric the dashboard and the alerts
//! name is exported is a unit test of the metrics module.)

use std::{collections::HashSet, path::PathBuf, process::Command};

use integration_tests::tracer_bin;
use serde_json::Value as Json;
use serde_norway::Value as Yaml;

fn deploy_file(path: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(path);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every document of a multi-document YAML file.
fn documents(text: &str) -> Vec<Yaml> {
    serde_norway::Deserializer::from_str(text)
        .map(|document| serde::Deserialize::deserialize(document).expect("valid YAML"))
        .filter(|document: &Yaml| !document.is_null())
        .collect()
}

fn kind_of<'a>(documents: &'a [Yaml], kind: &str) -> &'a Yaml {
    documents
        .iter()
        .find(|d| d["kind"].as_str() == Some(kind))
        .unwrap_or_else(|| panic!("no {kind} in {documents:?}"))
}

fn strings(value: &Yaml) -> Vec<&str> {
    value
        .as_sequence()
        .map(|items| items.iter().filter_map(Yaml::as_str).collect())
        .unwrap_or_default()
}

#[test]
fn the_daemonset_runs_the_agent_on_every_node_with_least_privilege() {
    let documents = documents(&deploy_file("kubernetes/daemonset.yaml"));
    for document in &documents {
        assert!(document["apiVersion"].is_string(), "{document:?}");
        assert!(document["metadata"]["name"].is_string(), "{document:?}");
    }
    let daemonset = kind_of(&documents, "DaemonSet");
    assert_eq!(daemonset["apiVersion"].as_str(), Some("apps/v1"));
    let selector = &daemonset["spec"]["selector"]["matchLabels"];
    let pod = &daemonset["spec"]["template"];
    for (key, value) in selector.as_mapping().expect("a selector") {
        assert_eq!(
            &pod["metadata"]["labels"][key], value,
            "the selector must match the pod's labels"
        );
    }
    let spec = &pod["spec"];
    assert_eq!(spec["hostPID"].as_bool(), Some(true));
    assert_eq!(spec["hostNetwork"].as_bool(), Some(true));

    let containers = spec["containers"].as_sequence().expect("containers");
    assert_eq!(containers.len(), 1);
    let tracer = &containers[0];
    let security = &tracer["securityContext"];
    assert_eq!(security["privileged"].as_bool(), Some(false));
    assert_eq!(strings(&security["capabilities"]["drop"]), ["ALL"]);
    let added: HashSet<&str> = strings(&security["capabilities"]["add"])
        .into_iter()
        .collect();
    assert!(
        added.contains("BPF") && added.contains("PERFMON"),
        "{added:?}"
    );
    assert!(
        added.len() <= 5,
        "every added capability is explained: {added:?}"
    );
    for resources in ["requests", "limits"] {
        for resource in ["cpu", "memory"] {
            assert!(
                tracer["resources"][resources][resource].is_string(),
                "{resources}.{resource}"
            );
        }
    }

    let port = &tracer["ports"][0];
    assert_eq!(port["containerPort"].as_u64(), Some(19436));
    for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
        assert_eq!(tracer[probe]["httpGet"]["path"].as_str(), Some("/healthz"));
        assert_eq!(tracer[probe]["httpGet"]["port"], port["name"], "{probe}");
    }

    let volumes: HashSet<&str> = spec["volumes"]
        .as_sequence()
        .expect("volumes")
        .iter()
        .filter_map(|v| v["name"].as_str())
        .collect();
    let mounts = tracer["volumeMounts"].as_sequence().expect("mounts");
    let mounted: HashSet<&str> = mounts
        .iter()
        .filter_map(|m| m["mountPath"].as_str())
        .collect();
    for needed in ["/sys/kernel/btf", "/sys/kernel/tracing"] {
        assert!(mounted.contains(needed), "{needed} is not mounted");
    }
    for mount in mounts {
        assert!(
            volumes.contains(mount["name"].as_str().unwrap()),
            "{mount:?}"
        );
        assert_eq!(mount["readOnly"].as_bool(), Some(true), "{mount:?}");
    }

    // The agent accepts the arguments the manifest gives it (with the pod's IP
    // substituted); `--help` at the end stops it after they are parsed.
    let args: Vec<String> = strings(&tracer["args"])
        .iter()
        .map(|arg| arg.replace("$(POD_IP)", "10.0.0.7"))
        .collect();
    let output = Command::new(tracer_bin())
        .args(&args)
        .arg("--help")
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "tracer {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn the_podmonitor_scrapes_the_daemonsets_metrics_port() {
    let daemonset = documents(&deploy_file("kubernetes/daemonset.yaml"));
    let daemonset = kind_of(&daemonset, "DaemonSet");
    let monitors = documents(&deploy_file("kubernetes/podmonitor.yaml"));
    let monitor = kind_of(&monitors, "PodMonitor");
    let pod_labels = &daemonset["spec"]["template"]["metadata"]["labels"];
    for (key, value) in monitor["spec"]["selector"]["matchLabels"]
        .as_mapping()
        .expect("a selector")
    {
        assert_eq!(&pod_labels[key], value);
    }
    let endpoint = &monitor["spec"]["podMetricsEndpoints"][0];
    assert_eq!(
        endpoint["port"],
        daemonset["spec"]["template"]["spec"]["containers"][0]["ports"][0]["name"]
    );
    assert_eq!(endpoint["path"].as_str(), Some("/metrics"));
}

#[test]
fn the_dashboard_is_a_grafana_dashboard_whose_panels_all_query() {
    let dashboard: Json =
        serde_json::from_str(&deploy_file("grafana/dashboard.json")).expect("valid JSON");
    assert!(dashboard["title"].is_string());
    assert!(dashboard["uid"].is_string());
    assert!(dashboard["schemaVersion"].is_u64());
    let variables: HashSet<&str> = dashboard["templating"]["list"]
        .as_array()
        .expect("template variables")
        .iter()
        .filter_map(|v| v["name"].as_str())
        .collect();

    // Rows may nest panels (collapsed rows); look at every level.
    let mut panels: Vec<&Json> = Vec::new();
    let mut pending: Vec<&Json> = dashboard["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .collect();
    while let Some(panel) = pending.pop() {
        if let Some(nested) = panel["panels"].as_array() {
            pending.extend(nested);
        }
        panels.push(panel);
    }
    let mut ids = HashSet::new();
    let mut queries = 0;
    for panel in &panels {
        let id = panel["id"].as_u64().expect("a panel id");
        assert!(ids.insert(id), "panel id {id} is used twice");
        assert!(panel["title"].is_string(), "{panel}");
        for axis in ["x", "y", "w", "h"] {
            assert!(panel["gridPos"][axis].is_u64(), "{panel}");
        }
        if panel["type"] == "row" {
            continue;
        }
        let targets = panel["targets"].as_array().expect("a panel queries");
        assert!(!targets.is_empty(), "{panel}");
        for target in targets {
            let expr = target["expr"].as_str().expect("a PromQL query");
            assert!(expr.contains("tcptracer_"), "{expr}");
            // Every $variable the query uses is defined.
            for (at, _) in expr.match_indices('$') {
                let name: String = expr[at + 1..]
                    .trim_start_matches('{')
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                assert!(
                    name.starts_with("__") || variables.contains(name.as_str()),
                    "${name} in {expr}"
                );
            }
            queries += 1;
        }
    }
    assert!(queries >= 10, "{queries} queries");
}
