//! Load generator: provisions N devices on a running fleet server, connects
//! them all to its broker (one rumqttc client each), and has each publish a
//! signed state. Holds the connections until killed, printing progress.
//!
//!   cargo run --release -p outpost-fleet --example fleet_load -- \
//!       --server http://127.0.0.1:8700 --token T --broker-port 1883 --devices 1000
//!
//! Used by bench/fleet/run.sh to measure the server's memory with N devices.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use outpost_fleet::client::ApiClient;
use outpost_runtime::bundle::SecretKey;
use outpost_runtime::protocol::{topics, DeviceSigned, DeviceState, Status};

fn arg(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1).cloned()).unwrap_or_else(|| default.to_string())
}

fn main() -> anyhow::Result<()> {
    let server = arg("--server", "http://127.0.0.1:8700");
    let token = arg("--token", "");
    let port: u16 = arg("--broker-port", "1883").parse()?;
    let n: usize = arg("--devices", "1000").parse()?;
    let prefix = arg("--prefix", "load");
    let api = ApiClient::new(&server, &token)?;
    let started = Instant::now();
    let mut creds = Vec::with_capacity(n);
    for i in 0..n {
        let id = format!("{prefix}-{i:05}");
        let r = api.post_json("/v1/devices", &serde_json::json!({"device_id": id, "tags": ["load"]}))?;
        let cfg: toml::Value = toml::from_str(r["agent_config"].as_str().unwrap_or_default())?;
        let key = SecretKey::from_file_text(cfg["device_key"].as_str().unwrap_or_default(), std::path::Path::new("agent.toml"))?;
        creds.push((id, cfg["password"].as_str().unwrap_or_default().to_string(), key));
    }
    eprintln!("provisioned {n} devices in {:.1}s", started.elapsed().as_secs_f64());
    let connected = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    for (id, password, key) in creds {
        let connected = connected.clone();
        std::thread::Builder::new().stack_size(256 << 10).spawn(move || {
            let mut o = rumqttc::MqttOptions::new(id.clone(), "127.0.0.1", port);
            o.set_credentials(id.clone(), password);
            o.set_keep_alive(Duration::from_secs(60));
            let (client, mut conn) = rumqttc::Client::new(o, 10);
            let mut counter = 1;
            for ev in conn.iter() {
                match ev {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => {
                        connected.fetch_add(1, Ordering::SeqCst);
                        let mut s = DeviceState::new(Status::Idle);
                        s.tags = vec!["load".into()];
                        if let Ok(m) = DeviceSigned::sign(&id, counter, &s, &key) {
                            let _ = client.try_publish(topics::state(&id), rumqttc::QoS::AtLeastOnce, true, m.to_bytes());
                        }
                        counter += 1;
                    }
                    Ok(_) => {}
                    Err(_) => std::thread::sleep(Duration::from_secs(1)),
                }
            }
        })?;
    }
    loop {
        std::thread::sleep(Duration::from_secs(1));
        let c = connected.load(Ordering::SeqCst);
        eprintln!("connected {c}/{n} after {:.1}s", started.elapsed().as_secs_f64());
        if c >= n {
            println!("all {n} connected in {:.1}s", started.elapsed().as_secs_f64());
            // Hold the connections for the measurement.
            loop {
                std::thread::sleep(Duration::from_secs(3600));
            }
        }
    }
}
