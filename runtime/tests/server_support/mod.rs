//! What the HTTP server tests share: fixtures, a tiny multi-input model
//! built in code, and a minimal HTTP/1.1 client over a plain `TcpStream` (so
//! tests control every byte: declared lengths, half-sent bodies, keep-alive).
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use outpost_runtime::model::{LoadOptions, Model, ModelFormat};
use outpost_runtime::server::{Deployed, ModelInfo, ModelSlot, RunningServer, Server, ServerConfig};
use serde_json::Value;

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").join("fixtures").join(name)
}

pub fn deployed(name: &str) -> Deployed {
    Deployed::load_file(fixture(name), &LoadOptions::default()).expect("fixture loads")
}

/// The breast-cancer test rows (features) and their labels.
pub fn bc_test_rows() -> (Vec<Vec<f32>>, Vec<i64>) {
    read_csv(&fixture("data/bc_test.csv"))
}

pub fn bc_train_rows() -> (Vec<Vec<f32>>, Vec<i64>) {
    read_csv(&fixture("data/bc_train.csv"))
}

fn read_csv(path: &PathBuf) -> (Vec<Vec<f32>>, Vec<i64>) {
    let text = std::fs::read_to_string(path).expect("csv readable");
    let mut rows = Vec::new();
    let mut labels = Vec::new();
    for line in text.lines().skip(1).filter(|l| !l.trim().is_empty()) {
        let mut values: Vec<f64> = line.split(',').map(|v| v.trim().parse().expect("number")).collect();
        let label = values.pop().expect("label column");
        labels.push(label as i64);
        rows.push(values.into_iter().map(|v| v as f32).collect());
    }
    (rows, labels)
}

pub fn config() -> ServerConfig {
    ServerConfig { listen: "127.0.0.1:0".into(), ..ServerConfig::default() }
}

pub fn start(slot: Arc<ModelSlot>, config: ServerConfig) -> RunningServer {
    Server::start(config, slot).expect("server starts")
}

pub fn start_with(name: &str) -> RunningServer {
    start(Arc::new(ModelSlot::with(deployed(name))), config())
}

/// bc_mlp with a drift monitor whose reference is the training rows and the
/// model's own labels on them, served with the test config.
pub fn start_with_drift() -> (RunningServer, Arc<outpost_runtime::drift::DriftMonitor>) {
    use outpost_runtime::drift::{DriftMonitor, MonitorConfig, OutputValues, ReferenceOptions, ReferenceOutput, ReferenceSketch};
    use outpost_runtime::tensor::{TensorData, TensorValues};
    let (train, _) = bc_train_rows();
    let base = deployed("bc_mlp.onnx");
    let flat: Vec<f32> = train.iter().flatten().copied().collect();
    let out = base.model().run(vec![TensorData::f32(vec![train.len(), 30], flat).expect("shape")]).expect("runs");
    let TensorValues::I64(labels) = &out[0].values else { panic!("bc_mlp's labels are i64") };
    let names: Vec<String> = (0..30).map(|i| format!("f{i}")).collect();
    let reference = ReferenceSketch::from_samples(
        &names,
        &train,
        &[ReferenceOutput { name: "output_label".into(), values: OutputValues::Classes(labels.clone()) }],
        &ReferenceOptions::default(),
    )
    .expect("reference");
    let monitor = Arc::new(DriftMonitor::new(Arc::new(reference), MonitorConfig::default()).expect("monitor"));
    let deployed = base.with_drift(monitor.clone()).expect("the reference fits the model");
    (start(Arc::new(ModelSlot::with(deployed)), config()), monitor)
}

/// A three-input model exercising every v2 datatype the tests need:
/// `x` FP32 [N,2], `k` INT64 [N,2], `m` INT32 [N,1] →
/// `y = x + float(k)` FP32 [N,2], `z = m * m` INT32 [N,1], `k2 = k + k` INT64 [N,2].
pub fn multi_input_model() -> Deployed {
    use prost::Message;
    use tract_onnx::pb::{attribute_proto::AttributeType, tensor_proto::DataType, AttributeProto, GraphProto, ModelProto, OperatorSetIdProto};
    use Dim::{Fixed, Named};
    let cast = AttributeProto {
        name: "to".into(),
        r#type: AttributeType::Int as i32,
        i: DataType::Float as i64,
        ..Default::default()
    };
    let graph = GraphProto {
        name: "multi".into(),
        node: vec![
            node("Cast", &["k"], "kf", vec![cast]),
            node("Add", &["x", "kf"], "y", vec![]),
            node("Mul", &["m", "m"], "z", vec![]),
            node("Add", &["k", "k"], "k2", vec![]),
        ],
        input: vec![
            value_info("x", DataType::Float, &[Named("N"), Fixed(2)]),
            value_info("k", DataType::Int64, &[Named("N"), Fixed(2)]),
            value_info("m", DataType::Int32, &[Named("N"), Fixed(1)]),
        ],
        output: vec![
            value_info("y", DataType::Float, &[Named("N"), Fixed(2)]),
            value_info("z", DataType::Int32, &[Named("N"), Fixed(1)]),
            value_info("k2", DataType::Int64, &[Named("N"), Fixed(2)]),
        ],
        ..Default::default()
    };
    let proto = ModelProto {
        ir_version: 7,
        opset_import: vec![OperatorSetIdProto { domain: String::new(), version: 13 }],
        producer_name: "outpost-server-tests".into(),
        graph: Some(graph),
        ..Default::default()
    };
    let bytes = proto.encode_to_vec();
    let model = Model::from_bytes(&bytes, ModelFormat::Onnx, &LoadOptions::default()).expect("multi-input model loads");
    let info = ModelInfo::for_plain_file(std::path::Path::new("multi.onnx"), &bytes, ModelFormat::Onnx);
    Deployed::new(model, info)
}

// ------------------------------------------------------------ ONNX in code

/// A dimension of a declared input or output: fixed, or named (free).
pub enum Dim {
    Fixed(i64),
    Named(&'static str),
}

/// A declared graph input or output of element type `t`.
pub fn value_info(name: &str, t: tract_onnx::pb::tensor_proto::DataType, dims: &[Dim]) -> tract_onnx::pb::ValueInfoProto {
    use tract_onnx::pb::{tensor_shape_proto, type_proto, TensorShapeProto, TypeProto, ValueInfoProto};
    let dim = dims
        .iter()
        .map(|d| tensor_shape_proto::Dimension {
            denotation: String::new(),
            value: Some(match d {
                Dim::Fixed(d) => tensor_shape_proto::dimension::Value::DimValue(*d),
                Dim::Named(n) => tensor_shape_proto::dimension::Value::DimParam(n.to_string()),
            }),
        })
        .collect();
    ValueInfoProto {
        name: name.into(),
        r#type: Some(TypeProto {
            denotation: String::new(),
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: t as i32,
                shape: Some(TensorShapeProto { dim }),
            })),
        }),
        doc_string: String::new(),
    }
}

/// One node of `op`, named after its output.
pub fn node(
    op: &str,
    inputs: &[&str],
    output: &str,
    attribute: Vec<tract_onnx::pb::AttributeProto>,
) -> tract_onnx::pb::NodeProto {
    tract_onnx::pb::NodeProto {
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: vec![output.into()],
        name: format!("{op}_{output}"),
        op_type: op.into(),
        attribute,
        ..Default::default()
    }
}

// ------------------------------------------------------------------ client

#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// The `error.code` of an error body.
    pub fn code(&self) -> String {
        self.json()["error"]["code"].as_str().unwrap_or_default().to_string()
    }
}

/// A keep-alive connection.
pub struct Client {
    reader: BufReader<TcpStream>,
}

impl Client {
    pub fn connect(addr: SocketAddr) -> Client {
        let stream = TcpStream::connect(addr).expect("connect");
        stream.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
        stream.set_nodelay(true).expect("nodelay");
        Client { reader: BufReader::new(stream) }
    }

    pub fn stream(&mut self) -> &mut TcpStream {
        self.reader.get_mut()
    }

    pub fn send(&mut self, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) {
        let mut head = format!("{method} {path} HTTP/1.1\r\nHost: test\r\n");
        let mut has_length = false;
        for (k, v) in headers {
            has_length |= k.eq_ignore_ascii_case("content-length") || k.eq_ignore_ascii_case("transfer-encoding");
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        if !has_length && (method == "POST" || !body.is_empty()) {
            head.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        head.push_str("\r\n");
        let s = self.stream();
        s.write_all(head.as_bytes()).expect("write head");
        s.write_all(body).expect("write body");
    }

    pub fn read_head(&mut self) -> (u16, Vec<(String, String)>) {
        let mut line = String::new();
        self.reader.read_line(&mut line).expect("status line");
        let status: u16 = line.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or_else(|| {
            panic!("bad status line {line:?}");
        });
        let mut headers = Vec::new();
        loop {
            let mut h = String::new();
            self.reader.read_line(&mut h).expect("header line");
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                headers.push((k.trim().to_string(), v.trim().to_string()));
            }
        }
        (status, headers)
    }

    pub fn read(&mut self) -> Resp {
        let (status, headers) = self.read_head();
        let len: usize = headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(0);
        let mut body = vec![0; len];
        self.reader.read_exact(&mut body).expect("body");
        Resp { status, headers, body }
    }

    pub fn request(&mut self, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Resp {
        self.send(method, path, headers, body);
        self.read()
    }

    pub fn get(&mut self, path: &str) -> Resp {
        self.request("GET", path, &[], b"")
    }

    pub fn post(&mut self, path: &str, body: &str) -> Resp {
        self.request("POST", path, &[], body.as_bytes())
    }

    pub fn post_json(&mut self, path: &str, body: &Value) -> Resp {
        self.request("POST", path, &[("Content-Type", "application/json")], body.to_string().as_bytes())
    }
}

/// One request on a fresh connection.
pub fn get(addr: SocketAddr, path: &str) -> Resp {
    Client::connect(addr).get(path)
}

pub fn post(addr: SocketAddr, path: &str, body: &str) -> Resp {
    Client::connect(addr).post(path, body)
}

pub fn post_json(addr: SocketAddr, path: &str, body: &Value) -> Resp {
    Client::connect(addr).post_json(path, body)
}

pub fn features_body(row: &[f32]) -> Value {
    serde_json::json!({ "features": row })
}

/// The value of an unlabelled sample (or the sum over label sets matching
/// `labels`) in a Prometheus text exposition.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (metric_name, rest) = match series.split_once('{') {
                Some((n, r)) => (n, r),
                None => (series, ""),
            };
            if metric_name != name {
                return None;
            }
            if !labels.iter().all(|(k, v)| rest.contains(&format!("{k}=\"{v}\""))) {
                return None;
            }
            value.parse::<f64>().ok()
        })
        .sum()
}
