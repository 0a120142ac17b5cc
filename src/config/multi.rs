//! Validation of multi-master groups (`mode = "multi-master"`, `members`):
//! the two shapes of a group are exclusive, and a member belongs to its
//! group alone. Errors carry the span of the offending key.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;
use std::time::Duration;

use super::raw::RawGroup;
use super::{
    DEFAULT_MAX_CLOCK_SKEW, DeviceConfig, EchoDetection, GroupConfig, GroupMode, MultiMaster,
};

/// Where in the file, and why.
pub(super) type Invalid = (Range<usize>, String);

/// Which of the two shapes a group has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Shape {
    OneWay,
    MultiMaster,
}

/// The group's shape from its `mode`, with the keys of the other shape
/// rejected.
pub(super) fn shape(name: &str, g: &RawGroup) -> Result<Shape, Invalid> {
    let shape = match &g.mode {
        None => Shape::OneWay,
        Some(m) => match m.get_ref().as_str() {
            "one-way" => Shape::OneWay,
            "multi-master" => Shape::MultiMaster,
            other => {
                return Err((
                    m.span(),
                    format!(
                        "group {name:?}: mode must be \"one-way\" or \"multi-master\", not {other:?}"
                    ),
                ));
            }
        },
    };
    match shape {
        Shape::OneWay => {
            let only_multi = [
                g.members.as_ref().map(|v| (v.span(), "members")),
                g.echo_detection
                    .as_ref()
                    .map(|v| (v.span(), "echo_detection")),
                g.max_clock_skew_secs
                    .as_ref()
                    .map(|v| (v.span(), "max_clock_skew_secs")),
            ];
            if let Some((span, key)) = only_multi.into_iter().flatten().next() {
                return Err((
                    span,
                    format!(
                        "group {name:?}: {key} is a key of multi-master groups; add mode = \"multi-master\" \
                         (with members instead of sources and targets) or remove it"
                    ),
                ));
            }
        }
        Shape::MultiMaster => {
            let only_one_way = [
                g.sources.as_ref().map(|v| (v.span(), "sources")),
                g.targets.as_ref().map(|v| (v.span(), "targets")),
            ];
            if let Some((span, key)) = only_one_way.into_iter().flatten().next() {
                return Err((
                    span,
                    format!(
                        "group {name:?}: a multi-master group has members, not {key}: every member is \
                         both where changes are made and where they arrive"
                    ),
                ));
            }
            if let Some(p) = &g.propagate_delete_all {
                return Err((
                    p.span(),
                    format!(
                        "group {name:?}: propagate_delete_all is a key of one-way groups; in a \
                         multi-master group a delete-all at a member is never propagated (the member \
                         is reconciled from the others instead)"
                    ),
                ));
            }
        }
    }
    Ok(shape)
}

/// A multi-master group, checked against the devices and the groups
/// before it: at least two declared members, each listed once, none in
/// another group (a member's events are its own changes there, and only
/// its group writes to it).
#[allow(clippy::too_many_arguments)]
pub(super) fn multi_master(
    name: String,
    group_span: Range<usize>,
    g: RawGroup,
    devices: &BTreeMap<u32, DeviceConfig>,
    sources_seen: &BTreeSet<u32>,
    targets_seen: &BTreeMap<u32, String>,
    members_seen: &BTreeMap<u32, String>,
) -> Result<GroupConfig, Invalid> {
    let Some(members) = g.members else {
        return Err((
            group_span,
            format!("group {name:?}: mode = \"multi-master\" needs members = [...]"),
        ));
    };
    let span = members.span();
    let list = members.into_inner();
    if list.len() < 2 {
        return Err((
            span,
            format!("group {name:?}: a multi-master group needs at least two members"),
        ));
    }
    let mut seen = BTreeSet::new();
    for id in &list {
        if !devices.contains_key(id) {
            return Err((
                span,
                format!("group {name:?}: members names device {id}, which no [[device]] declares"),
            ));
        }
        if !seen.insert(*id) {
            return Err((
                span,
                format!("group {name:?}: device {id} is listed twice in members"),
            ));
        }
        if let Some(other) = members_seen.get(id) {
            return Err((
                span,
                format!(
                    "group {name:?}: device {id} is already a member of multi-master group {other:?}; \
                     a device is a member of one multi-master group only (list every member in one group)"
                ),
            ));
        }
        if let Some(other) = targets_seen.get(id) {
            return Err((
                span,
                format!(
                    "group {name:?}: device {id} is a target of group {other:?}; a member of a \
                     multi-master group belongs to that group only (two groups writing one door would \
                     undo each other's changes)"
                ),
            ));
        }
        if sources_seen.contains(id) {
            return Err((
                span,
                format!(
                    "group {name:?}: device {id} is a source of another group; a member of a \
                     multi-master group belongs to that group only (the group's writes to it would \
                     pass for changes there)"
                ),
            ));
        }
    }
    let echo = match &g.echo_detection {
        None => EchoDetection::Observe,
        Some(e) => match e.get_ref().as_str() {
            "changed-on-device" => EchoDetection::ChangedOnDevice,
            "own-writes" => EchoDetection::OwnWrites,
            other => {
                return Err((
                    e.span(),
                    format!(
                        "group {name:?}: echo_detection must be \"changed-on-device\" or \"own-writes\", \
                         not {other:?} (leave it out to decide by what the members report)"
                    ),
                ));
            }
        },
    };
    let max_clock_skew = match &g.max_clock_skew_secs {
        None => DEFAULT_MAX_CLOCK_SKEW,
        Some(v) if (1..=86_400).contains(v.get_ref()) => Duration::from_secs(*v.get_ref()),
        Some(v) => {
            return Err((
                v.span(),
                format!("group {name:?}: max_clock_skew_secs must be between 1 and 86400"),
            ));
        }
    };
    Ok(GroupConfig {
        name,
        sources: Vec::new(),
        targets: Vec::new(),
        prune: g.prune,
        propagate_delete_all: false,
        mode: GroupMode::MultiMaster(MultiMaster {
            members: list,
            echo,
            max_clock_skew,
        }),
    })
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::super::{Config, ConfigError, EchoDetection, parse};
    use super::*;

    const HEAD: &str = r#"[gateway]
address = "127.0.0.1:4000"
tls = false
[state]
dir = "/var/lib/usersync"
[[device]]
id = 1
address = "a"
[[device]]
id = 2
address = "b"
[[device]]
id = 3
address = "c"
[[device]]
id = 4
address = "d"
"#;

    fn parse_groups(groups: &str) -> Result<Config, ConfigError> {
        parse(
            Path::new("/etc/usersync/usersync.toml"),
            &format!("{HEAD}{groups}"),
        )
    }

    /// The error's line (counted from the first group line, 1-based) and
    /// reason.
    fn err(groups: &str, line_in_groups: usize, needle: &str) {
        let e = parse_groups(groups).unwrap_err();
        let head_lines = HEAD.lines().count();
        assert_eq!(e.line, Some(head_lines + line_in_groups), "{e}");
        assert!(e.reason.contains(needle), "{e}");
    }

    #[test]
    fn a_multi_master_group_gets_defaults() {
        let c = parse_groups(
            "[[group]]\nname = \"desks\"\nmode = \"multi-master\"\nmembers = [2, 1, 3]\n",
        )
        .unwrap();
        let g = &c.groups[0];
        let mm = g.multi_master().unwrap();
        assert_eq!(mm.members, vec![2, 1, 3], "member order is kept");
        assert_eq!(mm.echo, EchoDetection::Observe);
        assert_eq!(mm.max_clock_skew, DEFAULT_MAX_CLOCK_SKEW);
        assert!(g.sources.is_empty() && g.targets.is_empty());
        assert!(!g.prune);
        assert_eq!(c.member_of(3).map(|g| g.name.as_str()), Some("desks"));
        assert!(c.member_of(4).is_none());
        assert!(!c.is_source(1), "members are no one-way sources");
        let c = parse_groups(
            "[[group]]\nname = \"d\"\nmode = \"multi-master\"\nmembers = [1, 2]\necho_detection = \"own-writes\"\n\
             max_clock_skew_secs = 30\nprune = true\n[[group]]\nname = \"o\"\nsources = [3]\ntargets = [4]\n",
        )
        .unwrap();
        let mm = c.groups[0].multi_master().unwrap();
        assert_eq!(mm.echo, EchoDetection::OwnWrites);
        assert_eq!(mm.max_clock_skew, Duration::from_secs(30));
        assert!(c.groups[0].prune);
        assert_eq!(c.groups[1].mode, GroupMode::OneWay);
        assert!(c.groups[1].members().is_empty());
        let c = parse_groups(
            "[[group]]\nname = \"d\"\nmode = \"multi-master\"\nmembers = [1, 2]\necho_detection = \"changed-on-device\"\n",
        )
        .unwrap();
        assert_eq!(
            c.groups[0].multi_master().unwrap().echo,
            EchoDetection::ChangedOnDevice
        );
        // `mode = "one-way"` is the default spelled out.
        let c = parse_groups(
            "[[group]]\nname = \"o\"\nmode = \"one-way\"\nsources = [1]\ntargets = [2]\n",
        )
        .unwrap();
        assert_eq!(c.groups[0].mode, GroupMode::OneWay);
    }

    #[test]
    fn the_two_shapes_are_exclusive() {
        err(
            "[[group]]\nname = \"d\"\nmode = \"multi-master\"\nmembers = [1, 2]\nsources = [3]\n",
            5,
            "has members, not sources",
        );
        err(
            "[[group]]\nname = \"d\"\nmode = \"multi-master\"\nmembers = [1, 2]\ntargets = [3]\n",
            5,
            "has members, not targets",
        );
        err(
            "[[group]]\nname = \"d\"\nsources = [1]\ntargets = [2]\nmembers = [3, 4]\n",
            5,
            "members is a key of multi-master groups",
        );
        err(
            "[[group]]\nname = \"d\"\nsources = [1]\ntargets = [2]\necho_detection = \"own-writes\"\n",
            5,
            "echo_detection is a key",
        );
        err(
            "[[group]]\nname = \"d\"\nsources = [1]\ntargets = [2]\nmax_clock_skew_secs = 5\n",
            5,
            "max_clock_skew_secs is a key",
        );
        err(
            "[[group]]\nname = \"d\"\nmode = \"multi-master\"\nmembers = [1, 2]\npropagate_delete_all = true\n",
            5,
            "never propagated",
        );
        err(
            "[[group]]\nname = \"d\"\nmode = \"mesh\"\nmembers = [1, 2]\n",
            3,
            "mode must be \"one-way\" or \"multi-master\"",
        );
        err(
            "[[group]]\nname = \"d\"\nmode = \"multi-master\"\n",
            1,
            "needs members",
        );
        err(
            "[[group]]\nname = \"d\"\nsources = [1]\n",
            1,
            "needs sources and targets",
        );
    }

    #[test]
    fn members_are_checked() {
        err(
            "[[group]]\nname = \"d\"\nmode = \"multi-master\"\nmembers = [1]\n",
            4,
            "at least two members",
        );
        err(
            "[[group]]\nname = \"d\"\nmode = \"multi-master\"\nmembers = [1, 9]\n",
            4,
            "device 9, which no [[device]] declares",
        );
        err(
            "[[group]]\nname = \"d\"\nmode = \"multi-master\"\nmembers = [1, 2, 1]\n",
            4,
            "listed twice",
        );
        err(
            "[[group]]\nname = \"d\"\nmode = \"multi-master\"\nmembers = [1, 2]\necho_detection = \"flag\"\n",
            5,
            "echo_detection must be",
        );
        err(
            "[[group]]\nname = \"d\"\nmode = \"multi-master\"\nmembers = [1, 2]\nmax_clock_skew_secs = 0\n",
            5,
            "between 1 and 86400",
        );
        err(
            "[[group]]\nname = \"d\"\nmode = \"multi-master\"\nmembers = [1, \"2\"]\n",
            4,
            "expected a device ID",
        );
    }

    #[test]
    fn a_member_belongs_to_its_group_alone() {
        let mm = |name: &str, members: &str| {
            format!(
                "[[group]]\nname = \"{name}\"\nmode = \"multi-master\"\nmembers = [{members}]\n"
            )
        };
        let one_way = |name: &str, s: &str, t: &str| {
            format!("[[group]]\nname = \"{name}\"\nsources = [{s}]\ntargets = [{t}]\n")
        };
        err(
            &format!("{}{}", mm("a", "1, 2"), mm("b", "2, 3")),
            8,
            "already a member of multi-master group \"a\"",
        );
        err(
            &format!("{}{}", one_way("o", "1", "3"), mm("b", "2, 3")),
            8,
            "target of group \"o\"",
        );
        err(
            &format!("{}{}", one_way("o", "1", "3"), mm("b", "1, 2")),
            8,
            "source of another group",
        );
        err(
            &format!("{}{}", mm("a", "1, 2"), one_way("o", "3", "2")),
            8,
            "targets names device 2, a member of multi-master group \"a\"",
        );
        err(
            &format!("{}{}", mm("a", "1, 2"), one_way("o", "1", "3")),
            7,
            "sources names device 1, a member",
        );
        // Disjoint groups are fine.
        let c = parse_groups(&format!("{}{}", mm("a", "1, 2"), one_way("o", "3", "4"))).unwrap();
        assert_eq!(c.groups.len(), 2);
    }

    #[test]
    fn a_reload_that_changes_a_group_restarts_it() {
        use super::super::{Change, diff};
        let a =
            parse_groups("[[group]]\nname = \"d\"\nmode = \"multi-master\"\nmembers = [1, 2]\n")
                .unwrap();
        let b =
            parse_groups("[[group]]\nname = \"d\"\nmode = \"multi-master\"\nmembers = [1, 2, 3]\n")
                .unwrap();
        let c = parse_groups("[[group]]\nname = \"d\"\nsources = [1]\ntargets = [2]\n").unwrap();
        assert!(diff(&a, &a).is_empty());
        assert_eq!(diff(&a, &b), vec![Change::ChangeGroup("d".into())]);
        assert_eq!(diff(&a, &c), vec![Change::ChangeGroup("d".into())]);
    }
}
