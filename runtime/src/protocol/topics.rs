//! Topic names. Build them here, never by hand, so both sides agree.
//!
//! ```
//! use outpost_runtime::protocol::topics;
//! assert_eq!(topics::desired("pi-7"), "outpost/v1/devices/pi-7/desired");
//! assert_eq!(topics::all(topics::Kind::State), "outpost/v1/devices/+/state");
//! assert_eq!(topics::parse("outpost/v1/devices/pi-7/chunks/request"), Some(("pi-7", topics::Kind::ChunkRequest)));
//! ```

/// The root of every Outpost topic.
pub const ROOT: &str = "outpost/v1";

/// The per-device topics.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    /// fleet → device, retained: the signed directive.
    Desired,
    /// device → fleet, retained: signed JSON state; the signed last will (`DeviceWill`).
    State,
    /// device → fleet: signed JSON telemetry.
    Telemetry,
    /// device → fleet: signed postcard sketches.
    Sketch,
    /// device → fleet: signed chunk requests.
    ChunkRequest,
    /// fleet → device: chunk replies.
    ChunkData,
}

impl Kind {
    pub const ALL: [Kind; 6] =
        [Kind::Desired, Kind::State, Kind::Telemetry, Kind::Sketch, Kind::ChunkRequest, Kind::ChunkData];

    /// The topic's suffix after `devices/{id}/`.
    pub fn suffix(self) -> &'static str {
        match self {
            Kind::Desired => "desired",
            Kind::State => "state",
            Kind::Telemetry => "telemetry",
            Kind::Sketch => "sketch",
            Kind::ChunkRequest => "chunks/request",
            Kind::ChunkData => "chunks/data",
        }
    }

    /// Whether messages on this topic are retained by the broker.
    pub fn retained(self) -> bool {
        matches!(self, Kind::Desired | Kind::State)
    }
}

/// `outpost/v1/devices/{id}/{suffix}`. The id is not checked here: check it
/// once with [`validate_device_id`](super::validate_device_id) where it
/// enters (config, provisioning).
pub fn device(id: &str, kind: Kind) -> String {
    format!("{ROOT}/devices/{id}/{}", kind.suffix())
}

pub fn desired(id: &str) -> String {
    device(id, Kind::Desired)
}

pub fn state(id: &str) -> String {
    device(id, Kind::State)
}

pub fn telemetry(id: &str) -> String {
    device(id, Kind::Telemetry)
}

pub fn sketch(id: &str) -> String {
    device(id, Kind::Sketch)
}

pub fn chunk_request(id: &str) -> String {
    device(id, Kind::ChunkRequest)
}

pub fn chunk_data(id: &str) -> String {
    device(id, Kind::ChunkData)
}

/// The filter matching this kind for every device (for the fleet).
pub fn all(kind: Kind) -> String {
    format!("{ROOT}/devices/+/{}", kind.suffix())
}

/// Splits a device topic into its device id and kind; `None` for anything
/// else (including an id that is not a valid device id).
pub fn parse(topic: &str) -> Option<(&str, Kind)> {
    let rest = topic.strip_prefix(ROOT)?.strip_prefix("/devices/")?;
    let (id, suffix) = rest.split_once('/')?;
    super::validate_device_id(id).ok()?;
    let kind = Kind::ALL.into_iter().find(|k| k.suffix() == suffix)?;
    Some((id, kind))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        for kind in Kind::ALL {
            assert_eq!(parse(&device("d-1", kind)), Some(("d-1", kind)));
        }
        assert_eq!(parse("outpost/v1/devices/a/b/state"), None);
        assert_eq!(parse("outpost/v2/devices/a/state"), None);
        assert_eq!(parse("outpost/v1/devices/+/state"), None);
        assert!(Kind::Desired.retained() && Kind::State.retained() && !Kind::Telemetry.retained());
    }
}
