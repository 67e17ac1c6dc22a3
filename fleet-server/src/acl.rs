//! The broker's topic ACL: who may publish and subscribe where. One pure
//! function, [`allowed`], asked by the embedded broker for every PUBLISH,
//! every SUBSCRIBE filter and the will of every CONNECT
//! ([`crate::broker`]); `fleet-server/mosquitto/acl` writes the same policy
//! in mosquitto's syntax, and `tests/broker_acl.rs` runs one table of cases
//! against both brokers.
//!
//! # Policy
//!
//! `{self}` is the connected device's own id (client id = username =
//! device id, checked at CONNECT); `D` = `outpost/v1/devices`.
//!
//! | client | action | topics | allowed |
//! |---|---|---|---|
//! | `outpost-fleet` | publish, subscribe, will | anything | yes |
//! | device | publish | `D/{self}/state`, `D/{self}/telemetry`, `D/{self}/sketch`, `D/{self}/chunks/request` (its uplink) | yes |
//! | device | will | `D/{self}/state` | yes |
//! | device | subscribe | exactly `D/{self}/desired`, `D/{self}/chunks/data` (its downlink) | yes |
//! | device | publish, subscribe | an application topic (below) | yes |
//! | device | publish | its own downlink (`desired`, `chunks/data`): only the fleet writes directives and chunks | no |
//! | device | subscribe | its own uplink: nothing there is for it | no |
//! | device | any | another device's topics, anything under `outpost/v1/fleet/` | no |
//! | device | subscribe | a wildcard filter that could match any `outpost/` topic: `#`, `+/…`, `outpost/#`, `D/+/…`, even `D/{self}/#` | no |
//! | device | any | a topic or filter beginning with `$` (`$SYS`, `$share/…`) | no |
//! | device | publish, will | a topic with `+` or `#` (not a topic) | no |
//! | `dashboard` (when configured) | subscribe | a filter under `outpost/v1/fleet/` (`outpost/v1/fleet/#`, `…/alerts`) | yes |
//! | `dashboard` | publish, will; subscribe elsewhere | anything | no |
//! | anyone else | — | — | refused at CONNECT ([`crate::broker::Authenticator`]) |
//!
//! An **application topic** is one whose first level is a literal other
//! than `outpost` and does not begin with `$` (`plant/line-1/temp`,
//! `sensors/+/reading`): it cannot match any Outpost topic, whatever the
//! rest of it says. The agent's streaming mode subscribes to such filters
//! and publishes its results there on the device's one connection
//! (`agent/src/config.rs` refuses stream filters that would cover
//! `outpost/…`). Devices may talk to each other there: that is the
//! application's business, not the fleet's.
//!
//! Own subscriptions are exact filters only: the agent subscribes to
//! exactly these two (`agent/src/link.rs`), and an exact list cannot widen
//! by accident when a topic is added later.

use outpost_runtime::protocol::topics;

/// Who is asking (the broker identified it at CONNECT).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Client<'a> {
    /// The fleet server's own client ([`crate::broker::FLEET_CLIENT_ID`]).
    Fleet,
    /// The read-only dashboard identity ([`crate::broker::DASHBOARD_CLIENT_ID`]).
    Dashboard,
    /// A device, by its id.
    Device(&'a str),
}

/// What the client does with the topic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Publishes to this topic.
    Publish,
    /// Subscribes to this filter.
    Subscribe,
    /// Names this topic as its will (published for it when it drops).
    Will,
}

/// A device's uplink topics: what it may publish.
const UPLINK: [topics::Kind; 4] =
    [topics::Kind::State, topics::Kind::Telemetry, topics::Kind::Sketch, topics::Kind::ChunkRequest];
/// A device's downlink topics: what it may subscribe to.
const DOWNLINK: [topics::Kind; 2] = [topics::Kind::Desired, topics::Kind::ChunkData];

/// Whether `client` may do `access` on `topic` (a filter for
/// [`Access::Subscribe`]). The policy is the table in the module docs.
pub fn allowed(client: Client<'_>, access: Access, topic: &str) -> bool {
    let device = match client {
        Client::Fleet => return true,
        Client::Dashboard => return access == Access::Subscribe && dashboard_filter(topic),
        Client::Device(id) => id,
    };
    if access != Access::Subscribe && topic.contains(['+', '#']) {
        return false;
    }
    if application(topic) {
        // The will is the device's own offline marker, nothing else.
        return access != Access::Will;
    }
    let own = |kinds: &[topics::Kind]| kinds.iter().any(|&k| topic == topics::device(device, k));
    match access {
        Access::Publish => own(&UPLINK),
        Access::Will => topic == topics::state(device),
        Access::Subscribe => own(&DOWNLINK),
    }
}

/// A filter that matches only topics under `outpost/v1/fleet/`.
fn dashboard_filter(filter: &str) -> bool {
    filter.strip_prefix(topics::ROOT).and_then(|rest| rest.strip_prefix("/fleet/")).is_some_and(|rest| !rest.is_empty())
}

/// Whether `topic` (or filter) cannot match any Outpost topic: its first
/// level is a literal (no wildcard) other than `outpost`, and not a `$`
/// topic. A publish topic with a wildcard anywhere is no topic at all.
fn application(topic: &str) -> bool {
    let first = topic.split('/').next().unwrap_or("");
    let root = topics::ROOT.split('/').next().unwrap_or("outpost");
    !topic.is_empty() && first != root && !first.starts_with('$') && !first.contains(['+', '#'])
}

#[cfg(test)]
mod tests {
    use super::*;
    use Access::*;

    const A: Client = Client::Device("pi-a");

    fn all_kinds(id: &str) -> Vec<(topics::Kind, String)> {
        topics::Kind::ALL.iter().map(|&k| (k, topics::device(id, k))).collect()
    }

    #[test]
    fn the_fleet_may_do_anything() {
        for t in ["#", "outpost/v1/#", "outpost/v1/devices/+/state", "outpost/v1/fleet/alerts", "$SYS/x", ""] {
            for a in [Publish, Subscribe, Will] {
                assert!(allowed(Client::Fleet, a, t), "{a:?} {t}");
            }
        }
    }

    #[test]
    fn a_device_writes_only_its_uplink_and_reads_only_its_downlink() {
        // Every device topic kind, own and another's, every access: the
        // whole matrix, so a new topic kind must be placed deliberately.
        for (kind, topic) in all_kinds("pi-a") {
            let up = UPLINK.contains(&kind);
            let down = DOWNLINK.contains(&kind);
            assert_eq!(allowed(A, Publish, &topic), up, "publish {topic}");
            assert_eq!(allowed(A, Subscribe, &topic), down, "subscribe {topic}");
            assert_eq!(allowed(A, Will, &topic), kind == topics::Kind::State, "will {topic}");
        }
        for (_, topic) in all_kinds("pi-b") {
            for a in [Publish, Subscribe, Will] {
                assert!(!allowed(A, a, &topic), "{a:?} {topic}");
            }
        }
        // The uplink and downlink lists cover every kind exactly once.
        for k in topics::Kind::ALL {
            assert!(UPLINK.contains(&k) != DOWNLINK.contains(&k), "{k:?}");
        }
    }

    #[test]
    fn the_agent_s_real_subscriptions_and_publishes_pass() {
        // What agent/src/link.rs subscribes to and publishes, built the way it builds them.
        assert!(allowed(A, Subscribe, &topics::desired("pi-a")));
        assert!(allowed(A, Subscribe, &topics::chunk_data("pi-a")));
        for t in [topics::state("pi-a"), topics::telemetry("pi-a"), topics::sketch("pi-a"), topics::chunk_request("pi-a")] {
            assert!(allowed(A, Publish, &t), "{t}");
        }
        assert!(allowed(A, Will, &topics::state("pi-a")));
    }

    #[test]
    fn no_wildcard_reaches_another_device_or_the_fleet() {
        for f in [
            "#",
            "+",
            "+/#",
            "+/v1/devices/pi-b/desired",
            "outpost",
            "outpost/#",
            "outpost/+",
            "outpost/v1/#",
            "outpost/+/devices/pi-a/desired",
            "outpost/v1/devices/#",
            "outpost/v1/devices/+/desired",
            "outpost/v1/devices/+/+",
            "outpost/v1/devices/pi-a/#",
            "outpost/v1/devices/pi-a/+",
            "outpost/v1/devices/pi-a/chunks/+",
            "outpost/v1/devices/pi-a/chunks/#",
            "outpost/v1/devices/pi-a/desired/#",
            "outpost/v1/fleet/#",
            "outpost/v1/fleet/alerts",
            "outpost/v1/fleet/summary",
            "outpost/v1/fleet/rollouts/r1",
            "$SYS/#",
            "$share/g/outpost/v1/#",
            "$share/g/app/x",
            "",
        ] {
            assert!(!allowed(A, Subscribe, f), "subscribe {f}");
            assert!(!allowed(A, Publish, f), "publish {f}");
            assert!(!allowed(A, Will, f), "will {f}");
        }
    }

    #[test]
    fn near_misses_of_own_topics_are_refused() {
        for t in [
            "outpost/v1/devices/pi-a/state/x",
            "outpost/v1/devices/pi-a/",
            "outpost/v1/devices/pi-a",
            "outpost/v1/devices/pi-ab/state",
            "outpost/v1/devices/pi-/state",
            "outpost/v1/devices//state",
            "outpost//v1/devices/pi-a/state",
            "outpost/v2/devices/pi-a/state",
            "/outpost/v1/devices/pi-a/state",
        ] {
            for a in [Publish, Subscribe, Will] {
                let expect = a != Will && t.starts_with('/');
                assert_eq!(allowed(A, a, t), expect, "{a:?} {t}");
            }
        }
    }

    #[test]
    fn the_dashboard_only_reads_fleet_topics() {
        for f in ["outpost/v1/fleet/#", "outpost/v1/fleet/alerts", "outpost/v1/fleet/summary", "outpost/v1/fleet/rollouts/+"] {
            assert!(allowed(Client::Dashboard, Subscribe, f), "{f}");
            assert!(!allowed(Client::Dashboard, Publish, f), "{f}");
            assert!(!allowed(Client::Dashboard, Will, f), "{f}");
        }
        for f in ["#", "outpost/#", "outpost/v1/#", "outpost/v1/fleet", "outpost/v1/fleet/", "outpost/v1/+/alerts", "outpost/v1/devices/pi-a/state", "app/x", "$SYS/#"] {
            assert!(!allowed(Client::Dashboard, Subscribe, f), "{f}");
        }
    }

    #[test]
    fn application_topics_are_free_for_publish_and_subscribe_not_for_the_will() {
        for t in ["plant/line-1/temp", "sensors/+/reading", "sensors/#", "Outpost/v1/#", "outposts/x", "a", "/x", "x/outpost/v1/#"] {
            assert!(allowed(A, Subscribe, t), "subscribe {t}");
            assert!(!allowed(A, Will, t), "will {t}");
        }
        for t in ["plant/line-1/temp", "results", "Outpost/v1/devices/pi-b/desired"] {
            assert!(allowed(A, Publish, t), "publish {t}");
        }
        for t in ["sensors/+/reading", "sensors/#", "a/b+", "#"] {
            assert!(!allowed(A, Publish, t), "publish {t}");
        }
    }
}
