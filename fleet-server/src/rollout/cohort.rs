//! Deterministic cohorts: which devices each stage of a rollout reaches.
//!
//! Every targeted device gets a rank from `sha256(rollout id, device id)`:
//! the same rollout always picks the same canaries (a restart, a second
//! look at `rollout status`), and two rollouts pick unrelated ones, so the
//! same unlucky device is not always first.
//!
//! Devices are then dealt out tag by tag, round-robin: the best-ranked
//! device of each tag, then the second of each, and so on. The order is
//! the rollout order; stage *k* reaches a prefix of it, so its cohort
//! includes stage *k-1*'s. A stage of `p` percent of `n` devices reaches
//! `max(ceil(p·n/100), 1, #tags)` devices (never more than `n`): at least
//! one device, and at least one per tag — a version that only breaks on
//! Jetsons must meet a Jetson in the first stage, not at 50 %.
//!
//! The tags that count are the ones the rollout targets (`--tag`), or,
//! without `--tag`, every tag the targeted devices carry; untagged devices
//! form one group of their own.

use std::collections::{BTreeMap, HashSet};

use sha2::{Digest, Sha256};

/// A device as the cohort planner sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    pub id: String,
    pub tags: Vec<String>,
}

/// The rank of `device` in rollout `rollout` (lower goes first).
pub fn rank(rollout: &str, device: &str) -> u64 {
    let mut h = Sha256::new();
    h.update(rollout.as_bytes());
    // A separator, so ("ab","c") and ("a","bc") differ.
    h.update([0u8]);
    h.update(device.as_bytes());
    let d = h.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&d[..8]);
    u64::from_be_bytes(first)
}

/// The rollout order of `devices` (module docs). `tags` are the targeted
/// tags; empty means "group by every tag the devices carry".
pub fn order(rollout: &str, devices: &[Candidate], tags: &[String]) -> Vec<Candidate> {
    let mut groups: BTreeMap<String, Vec<&Candidate>> = BTreeMap::new();
    for d in devices {
        let keys: Vec<String> = if tags.is_empty() {
            if d.tags.is_empty() {
                vec![String::new()]
            } else {
                d.tags.clone()
            }
        } else {
            d.tags.iter().filter(|t| tags.contains(t)).cloned().collect()
        };
        for k in keys {
            groups.entry(k).or_default().push(d);
        }
    }
    for g in groups.values_mut() {
        g.sort_by_key(|d| (rank(rollout, &d.id), d.id.clone()));
    }
    let mut out = Vec::with_capacity(devices.len());
    let mut taken: HashSet<&str> = HashSet::new();
    let mut cursors: Vec<(usize, &Vec<&Candidate>)> = groups.values().map(|g| (0, g)).collect();
    while out.len() < devices.len() {
        let mut progressed = false;
        for (pos, group) in cursors.iter_mut() {
            // The next device of this group not already dealt via another tag.
            while *pos < group.len() && taken.contains(group[*pos].id.as_str()) {
                *pos += 1;
            }
            if let Some(d) = group.get(*pos) {
                taken.insert(d.id.as_str());
                out.push((*d).clone());
                *pos += 1;
                progressed = true;
            }
        }
        if !progressed {
            break;
        }
    }
    out
}

/// How many devices a stage of `percent` reaches out of `total`, with
/// `groups` tag groups (module docs).
pub fn stage_size(percent: u32, total: usize, groups: usize) -> usize {
    if total == 0 {
        return 0;
    }
    let by_percent = (percent as u128 * total as u128).div_ceil(100) as usize;
    by_percent.max(1).max(groups).min(total)
}

/// How many tag groups `order` dealt from (for [`stage_size`]).
pub fn group_count(devices: &[Candidate], tags: &[String]) -> usize {
    let mut keys: HashSet<&str> = HashSet::new();
    for d in devices {
        if tags.is_empty() {
            if d.tags.is_empty() {
                keys.insert("");
            }
            keys.extend(d.tags.iter().map(String::as_str));
        } else {
            keys.extend(d.tags.iter().filter(|t| tags.contains(t)).map(String::as_str));
        }
    }
    keys.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fleet() -> Vec<Candidate> {
        let mut v = Vec::new();
        for i in 0..40 {
            v.push(Candidate { id: format!("pi-{i:02}"), tags: vec!["pi4".into()] });
        }
        for i in 0..4 {
            v.push(Candidate { id: format!("jetson-{i}"), tags: vec!["jetson".into()] });
        }
        v
    }

    #[test]
    fn order_is_deterministic_and_depends_on_the_rollout() {
        let a = order("ro-1", &fleet(), &[]);
        assert_eq!(a, order("ro-1", &fleet(), &[]));
        let mut shuffled = fleet();
        shuffled.reverse();
        assert_eq!(a, order("ro-1", &shuffled, &[]), "input order does not matter");
        assert_ne!(a, order("ro-2", &fleet(), &[]));
        assert_eq!(a.len(), 44);
        let ids: HashSet<_> = a.iter().map(|d| &d.id).collect();
        assert_eq!(ids.len(), 44, "every device exactly once");
    }

    #[test]
    fn every_tag_gets_a_canary_in_the_first_stage() {
        let devices = fleet();
        let o = order("ro-9", &devices, &[]);
        let groups = group_count(&devices, &[]);
        assert_eq!(groups, 2);
        let n = stage_size(1, o.len(), groups);
        assert_eq!(n, 2, "1 % of 44 is 1, raised to one per tag");
        let tags: HashSet<_> = o[..n].iter().flat_map(|d| d.tags.clone()).collect();
        assert!(tags.contains("pi4") && tags.contains("jetson"), "{:?}", &o[..n]);
    }

    #[test]
    fn stage_sizes_round_up_and_cap() {
        assert_eq!(stage_size(10, 44, 2), 5);
        assert_eq!(stage_size(50, 44, 2), 22);
        assert_eq!(stage_size(100, 44, 2), 44);
        assert_eq!(stage_size(1, 3, 5), 3, "never more than the fleet");
        assert_eq!(stage_size(0, 10, 0), 1, "at least one device");
        assert_eq!(stage_size(50, 0, 0), 0);
    }

    #[test]
    fn targeted_tags_group_and_multi_tag_devices_come_once() {
        let devices = vec![
            Candidate { id: "a".into(), tags: vec!["pi4".into(), "site-a".into()] },
            Candidate { id: "b".into(), tags: vec!["pi4".into()] },
            Candidate { id: "c".into(), tags: vec!["site-a".into()] },
        ];
        let o = order("r", &devices, &["pi4".into(), "site-a".into()]);
        assert_eq!(o.len(), 3);
        assert_eq!(group_count(&devices, &["pi4".into()]), 1);
    }
}
