//! `outpost-fleet drift NAME@VERSION [--json] [--lifetime]`: the fleet's
//! drift view of a version (see [`crate::fleet_view`]) as a table.

use anyhow::Context;
use serde_json::Value;

use crate::cli::{table, ServerArgs};
use crate::client::ApiClient;

#[derive(Debug, clap::Args)]
pub struct DriftArgs {
    /// NAME@VERSION, a published version.
    pub target: String,
    /// Judge everything since the server started instead of the last hour.
    #[arg(long)]
    pub lifetime: bool,
    #[command(flatten)]
    pub server: ServerArgs,
}

fn cell(v: &Value, digits: usize) -> String {
    match v.as_f64() {
        Some(x) => format!("{x:.digits$}"),
        None => "-".into(),
    }
}

fn interval(v: &Value) -> String {
    match v.as_array().map(|a| (a.first().and_then(Value::as_f64), a.get(1).and_then(Value::as_f64))) {
        Some((Some(lo), Some(hi))) => format!("[{lo:.3}, {hi:.3}]"),
        _ => "-".into(),
    }
}

pub fn drift(args: &DriftArgs) -> anyhow::Result<String> {
    let (name, version) = crate::directives::parse_target(&args.target).map_err(|e| anyhow::anyhow!("{e}"))?;
    let client = ApiClient::new(&args.server.server, &args.server.token)?;
    let scope = if args.lifetime { "lifetime" } else { "recent" };
    let v = client.get(&format!("/v1/drift/{name}/{version}?scope={scope}")).context("drift")?;
    if args.server.json {
        return Ok(serde_json::to_string_pretty(&v)?);
    }
    let mut rows = Vec::new();
    for (section, cols) in [("feature", &v["features"]), ("output", &v["outputs"])] {
        for c in cols.as_array().into_iter().flatten() {
            let stat = if c["ks"].is_array() { format!("KS {}", interval(&c["ks"])) } else if c["tv"].is_array() { format!("TV {}", interval(&c["tv"])) } else { "-".into() };
            rows.push(vec![
                c["name"].as_str().unwrap_or("?").to_string(),
                section.to_string(),
                if c["drift"].as_bool() == Some(true) { "DRIFT".into() } else { "ok".into() },
                cell(&c["score"], 2),
                stat,
                cell(&c["psi"], 3),
                cell(&c["js"], 3),
                cell(&c["mean_shift_sd"], 2),
            ]);
        }
    }
    let drifting: Vec<&str> = v["devices_drifting"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
    Ok(format!(
        "{}@{} ({scope}): {} device(s), {} samples — {}\n{}\ndevices whose own verdict says drift: {}",
        name,
        version,
        v["devices"],
        v["samples"],
        if v["drift"].as_bool() == Some(true) { format!("DRIFT (score {})", cell(&v["score"], 2)) } else { format!("no drift (score {})", cell(&v["score"], 2)) },
        table(&["COLUMN", "KIND", "VERDICT", "SCORE", "STATISTIC [LO, HI]", "PSI", "JS", "MEAN SHIFT SD"], &rows),
        if drifting.is_empty() { "none".to_string() } else { drifting.join(", ") },
    ))
}
