//! What the streaming tests share: a real mosquitto broker on a free
//! loopback port, and an MQTT 5 test client that hands every incoming
//! publish to a channel.
#![allow(dead_code)]

use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use rumqttc::v5::mqttbytes::v5::{Filter, Packet, Publish, PublishProperties};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{Client, Event, MqttOptions};

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").join("fixtures").join(name)
}

/// The breast-cancer test rows without their label.
pub fn bc_rows() -> Vec<Vec<f32>> {
    let text = std::fs::read_to_string(fixture("data/bc_test.csv")).expect("csv");
    text.lines()
        .skip(1)
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let mut v: Vec<f32> = l.split(',').map(|x| x.trim().parse().expect("number")).collect();
            v.pop();
            v
        })
        .collect()
}

/// A mosquitto process on a free port, killed when dropped.
pub struct Broker {
    child: Child,
    pub port: u16,
    dir: PathBuf,
}

impl Broker {
    /// Starts mosquitto (the apt package `mosquitto`; CI installs it) on a
    /// free port. With `OUTPOST_SKIP_MOSQUITTO=1` a machine without it skips
    /// the test (`None`) instead of failing it.
    pub fn start() -> Option<Broker> {
        let port = TcpListener::bind("127.0.0.1:0").expect("free port").local_addr().unwrap().port();
        match Broker::spawn(port) {
            Ok(b) => Some(b),
            Err(e) if std::env::var("OUTPOST_SKIP_MOSQUITTO").is_ok_and(|v| v == "1") => {
                eprintln!("mosquitto not runnable ({e}); skipping as OUTPOST_SKIP_MOSQUITTO=1 asks");
                None
            }
            Err(e) => panic!("cannot run mosquitto ({e}): install the `mosquitto` package, or set OUTPOST_SKIP_MOSQUITTO=1 to skip"),
        }
    }

    /// A broker on `port`, or `None` if it does not come up (port still busy).
    pub fn start_on(port: u16) -> Option<Broker> {
        Broker::spawn(port).ok()
    }

    fn spawn(port: u16) -> Result<Broker, String> {
        let dir = std::env::temp_dir().join(format!("outpost-mosquitto-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let conf = dir.join("mosquitto.conf");
        std::fs::write(&conf, format!("listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nset_tcp_nodelay true\n"))
            .map_err(|e| e.to_string())?;
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| e.to_string())?;
        let mut broker = Broker { child, port, dir };
        let deadline = Instant::now() + Duration::from_secs(5);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline || broker.child.try_wait().ok().flatten().is_some() {
                return Err(format!("mosquitto did not listen on port {port}"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(broker)
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// What the test client saw.
#[derive(Debug)]
pub enum Seen {
    SubAck,
    Publish(Box<Publish>),
}

/// An MQTT 5 client whose incoming publishes arrive on a channel.
pub struct TestClient {
    pub client: Client,
    /// QoS of what it publishes and subscribes to (default 1).
    pub qos: QoS,
    seen: Receiver<Seen>,
}

impl TestClient {
    pub fn connect(broker: &Broker, id: &str) -> TestClient {
        let mut options = MqttOptions::new(id, "127.0.0.1", broker.port);
        options.set_keep_alive(Duration::from_secs(30));
        options.set_max_packet_size(Some(4 * 1024 * 1024));
        let mut network = rumqttc::NetworkOptions::new();
        network.set_tcp_nodelay(true);
        options.set_network_options(network);
        let (client, mut connection) = Client::new(options, 256);
        let (tx, seen) = channel();
        std::thread::spawn(move || {
            for event in connection.iter() {
                let sent = match event {
                    Ok(Event::Incoming(Packet::Publish(p))) => tx.send(Seen::Publish(Box::new(p))),
                    Ok(Event::Incoming(Packet::SubAck(_))) => tx.send(Seen::SubAck),
                    Ok(_) => Ok(()),
                    Err(_) => {
                        std::thread::sleep(Duration::from_millis(50));
                        Ok(())
                    }
                };
                if sent.is_err() {
                    return;
                }
            }
        });
        TestClient { client, qos: QoS::AtLeastOnce, seen }
    }

    pub fn subscribe(&self, filter: &str) {
        self.client.subscribe_many([Filter::new(filter, self.qos)]).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.seen.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(Seen::SubAck) => return,
                Ok(_) => {}
                Err(e) => panic!("no SUBACK for {filter}: {e:?}"),
            }
        }
    }

    pub fn publish(&self, topic: &str, payload: impl Into<Vec<u8>>, correlation: Option<&[u8]>, response_topic: Option<&str>) {
        let properties = PublishProperties {
            correlation_data: correlation.map(|c| c.to_vec().into()),
            response_topic: response_topic.map(str::to_string),
            ..PublishProperties::default()
        };
        let payload: Vec<u8> = payload.into();
        self.client.publish_with_properties(topic, self.qos, false, payload, properties).unwrap();
    }

    /// The next publish, or `None` after `timeout`.
    pub fn next(&self, timeout: Duration) -> Option<Publish> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.seen.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(Seen::Publish(p)) => return Some(*p),
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => return None,
            }
        }
    }
}

pub fn topic_of(p: &Publish) -> String {
    String::from_utf8(p.topic.to_vec()).unwrap()
}

pub fn correlation_of(p: &Publish) -> Option<Vec<u8>> {
    p.properties.as_ref()?.correlation_data.as_ref().map(|b| b.to_vec())
}

pub fn json_of(p: &Publish) -> serde_json::Value {
    serde_json::from_slice(&p.payload).unwrap_or_else(|e| panic!("reply is not JSON ({e}): {:?}", p.payload))
}
