//! The Prometheus endpoint: off by default; when configured, RPC counters,
//! error codes, latency histograms, pulls, pods/containers by state and the
//! daemon's own process figures, scraped over HTTP inside the test netns.

mod common;

use common::*;
use cri_proto::v1 as cri;
use std::collections::HashMap;
use std::io::{Read, Write};

const ADDR: &str = "127.0.0.1:9405";

/// GET /metrics; (status line, samples by name with labels).
fn scrape(ns: &Netns) -> (String, HashMap<String, f64>) {
    let mut s = ns
        .tcp_connect(ADDR)
        .expect("connect to the metrics endpoint");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: berth\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let (head, body) = resp.split_once("\r\n\r\n").expect("an HTTP response");
    let status = head.lines().next().unwrap_or_default().to_string();
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/openmetrics-text"),
        "{head}"
    );
    assert!(body.trim_end().ends_with("# EOF"), "{body}");
    let samples = body
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (name, value) = l.rsplit_once(' ').expect("name value");
            (name.to_string(), value.parse::<f64>().expect(l))
        })
        .collect();
    (status, samples)
}

/// The sample named `key` (`name{a="x",b="y"}`), its labels in any order.
fn get(samples: &HashMap<String, f64>, key: &str) -> f64 {
    find(samples, key).unwrap_or_else(|| panic!("no sample {key} in {samples:#?}"))
}

fn find(samples: &HashMap<String, f64>, key: &str) -> Option<f64> {
    let split = |k: &str| -> (String, Vec<String>) {
        match k.split_once('{') {
            Some((n, l)) => {
                let mut l: Vec<String> = l
                    .trim_end_matches('}')
                    .split(',')
                    .map(str::to_string)
                    .collect();
                l.sort();
                (n.to_string(), l)
            }
            None => (k.to_string(), Vec::new()),
        }
    };
    let want = split(key);
    samples
        .iter()
        .find(|(k, _)| split(k) == want)
        .map(|(_, v)| *v)
}

#[tokio::test]
async fn counters_histograms_and_gauges_move() {
    let mut env = Env::start_images(
        &["busybox"],
        &["busybox"],
        Env::config(&format!("[metrics]\naddress = \"{ADDR}\"\n")),
    )
    .await;
    let (status, first) = scrape(&env.ns);
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert_eq!(
        get(&first, "berth_rpc_requests_total{method=\"PullImage\"}"),
        1.0
    );
    assert_eq!(
        get(&first, "berth_image_pulls_total{result=\"success\"}"),
        1.0
    );
    assert!(get(&first, "berth_image_pull_bytes_total") > 0.0);
    assert_eq!(get(&first, "berth_image_pull_duration_seconds_count"), 1.0);
    assert!(get(&first, "berth_resident_memory_bytes") > 1e6);
    assert!(get(&first, "berth_open_fds") >= 3.0);

    for _ in 0..3 {
        env.rt
            .version(cri::VersionRequest::default())
            .await
            .unwrap();
    }
    let e = env
        .rt
        .container_status(cri::ContainerStatusRequest {
            container_id: "nope".into(),
            verbose: false,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
    let pod = env.pod("m").await;
    let ctr = env
        .create(&pod, sh("c", BUSYBOX, "sleep 1000"))
        .await
        .unwrap();
    env.rt
        .start_container(cri::StartContainerRequest {
            container_id: ctr.clone(),
        })
        .await
        .unwrap();

    let (_, second) = scrape(&env.ns);
    let version = |s: &HashMap<String, f64>| {
        find(s, "berth_rpc_requests_total{method=\"Version\"}").unwrap_or(0.0)
    };
    assert_eq!(version(&second) - version(&first), 3.0);
    assert_eq!(
        get(
            &second,
            "berth_rpc_errors_total{method=\"ContainerStatus\",code=\"NotFound\"}"
        ),
        1.0
    );
    // A histogram per method: its +Inf bucket holds every call.
    assert_eq!(
        get(
            &second,
            "berth_rpc_duration_seconds_bucket{le=\"+Inf\",method=\"Version\"}"
        ),
        version(&second)
    );
    assert_eq!(
        get(
            &second,
            "berth_rpc_duration_seconds_count{method=\"Version\"}"
        ),
        version(&second)
    );
    assert_eq!(get(&second, "berth_pods{state=\"ready\"}"), 1.0);
    assert_eq!(get(&second, "berth_containers{state=\"running\"}"), 1.0);
    assert_eq!(get(&second, "berth_containers{state=\"exited\"}"), 0.0);
    assert_eq!(get(&second, "berth_monitor_processes"), 1.0);
    assert_eq!(get(&second, "berth_infra_processes"), 1.0);

    env.rt
        .stop_container(cri::StopContainerRequest {
            container_id: ctr,
            timeout: 0,
        })
        .await
        .unwrap();
    let (_, third) = scrape(&env.ns);
    assert_eq!(get(&third, "berth_containers{state=\"running\"}"), 0.0);
    assert_eq!(get(&third, "berth_containers{state=\"exited\"}"), 1.0);
    assert_eq!(get(&third, "berth_monitor_processes"), 0.0);
    env.finish().await;
}

#[tokio::test]
async fn off_by_default_nothing_listens() {
    let env = Env::start_images(&[], &[], BerthOpts::default()).await;
    let e = env.ns.tcp_connect(ADDR).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}");
    env.finish().await;
}
