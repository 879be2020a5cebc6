//! The HAProxy agent-check protocol: the backend's own agent answers one line of words
//! separated by spaces or commas, and the balancer follows what it says. Pure: a line in, the
//! agent's state out.
//!
//! Words: `up`, `down`, `fail`, `stopped` (any of the last three may carry `#reason`, which
//! runs to the end of the line), `maint`, `drain`, `ready`; `N%` or `weight:N%` (weight relative
//! to the configured one), `weight:N` (an absolute weight); `maxconn:N`. What the agent set
//! stays until the agent itself undoes it: `up` undoes `down`, `ready` undoes `drain` and
//! `maint`. An agent that cannot be reached changes nothing.
//!
//! The agent is the backend's, so what it says is bounded: its weight is at most 256 % of the
//! configured one (HAProxy's bound) unless `agent_absolute_weights` lets `weight:N` set any,
//! and its text is shown only after `clean` (no terminal escapes, at most `MAX_TEXT` bytes).

use crate::model::MAX_WEIGHT;
pub use crate::status::signals::{AgentState, AgentWeight, MAX_PERCENT};

/// Longest agent text kept (the reply shown, a `#reason`), in bytes.
pub const MAX_TEXT: usize = 256;

/// Agent text made safe to store, log and print: each control character (Unicode Cc: ESC,
/// CR, LF, DEL, C1 and the rest) becomes a space, so a backend cannot drive the terminal of
/// whoever runs `lb health`; cut to `MAX_TEXT` bytes on a character boundary.
pub fn clean(text: &str) -> String {
    let mut out = String::with_capacity(text.len().min(MAX_TEXT));
    for c in text.chars() {
        let c = if c.is_control() { ' ' } else { c };
        if out.len() + c.len_utf8() > MAX_TEXT {
            break;
        }
        out.push(c);
    }
    out
}

/// Applies one reply line to `state`. A malformed line changes nothing and says why.
pub fn apply(state: &AgentState, line: &str) -> Result<AgentState, String> {
    let line = line.trim();
    if line.is_empty() {
        return Err("empty agent reply".into());
    }
    let (words, reason) = match line.split_once('#') {
        Some((w, r)) => (w, Some(clean(r).trim().to_string())),
        None => (line, None),
    };
    let mut next = state.clone();
    let mut any = false;
    for word in words.split([' ', ',', '\t']).filter(|w| !w.is_empty()) {
        any = true;
        let lower = word.to_ascii_lowercase();
        let number = |text: &str, max: u32| -> Result<u32, String> {
            text.parse::<u32>()
                .ok()
                .filter(|n| *n <= max)
                .ok_or_else(|| format!("agent reply {word:?}: {text:?} is not a number in 0..={max}"))
        };
        match lower.as_str() {
            "up" => next.down = None,
            "down" | "fail" | "stopped" => {
                next.down = Some(match &reason {
                    Some(r) if !r.is_empty() => format!("agent says {lower}: {r}"),
                    _ => format!("agent says {lower}"),
                })
            }
            "drain" => next.drain = true,
            "maint" => next.maint = true,
            "ready" => {
                next.drain = false;
                next.maint = false;
            }
            w => {
                if let Some(n) = w.strip_prefix("maxconn:") {
                    next.maxconn = Some(number(n, 1_000_000_000)?);
                } else if let Some(p) = w.strip_prefix("weight:").unwrap_or(w).strip_suffix('%') {
                    next.weight = Some(AgentWeight::Percent(number(p, MAX_PERCENT)?));
                } else if let Some(n) = w.strip_prefix("weight:") {
                    next.weight = Some(AgentWeight::Absolute(number(n, MAX_WEIGHT)?));
                } else {
                    return Err(format!("agent reply has an unknown word {word:?}"));
                }
            }
        }
    }
    if !any {
        return Err(format!("agent reply {:?} holds no word", clean(line)));
    }
    Ok(next)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn after(lines: &[&str]) -> AgentState {
        lines
            .iter()
            .fold(AgentState::default(), |s, l| apply(&s, l).expect(l))
    }

    #[test]
    fn words_do_what_they_say_and_only_the_agent_undoes_them() {
        assert!(after(&["drain"]).drain && after(&["drain"]).keeps_pinned_flows());
        assert!(!after(&["drain", "ready"]).excluded());
        assert!(after(&["maint"]).excluded() && !after(&["maint"]).keeps_pinned_flows());
        let down = after(&["down #disk full"]);
        assert_eq!(down.down.as_deref(), Some("agent says down: disk full"));
        assert!(after(&["down", "ready"]).excluded(), "ready does not undo down");
        assert!(!after(&["down", "up"]).excluded());
        assert!(after(&["stopped"]).excluded() && after(&["fail"]).excluded());
        assert_eq!(after(&["50%"]).weight(100), 50);
        assert_eq!(after(&["weight:25%"]).weight(200), 50);
        assert_eq!(after(&["weight:7"]).weight(200), 7);
        assert_eq!(
            after(&["75%", "up"]).weight(100),
            75,
            "the weight stays until changed"
        );
        let all = after(&["up, 80% maxconn:30 ready"]);
        assert_eq!(
            (all.weight(100), all.maxconn, all.excluded()),
            (80, Some(30), false)
        );
    }

    #[test]
    fn absolute_weights_are_capped_unless_allowed() {
        let s = after(&["weight:10000"]);
        // At most 256 % of the configured weight: 100 -> 256, 3 -> 8.
        assert_eq!(s.weight(100), 256);
        assert_eq!(s.weight(3), 8);
        assert_eq!(s.weight(0), 0, "a drained backend stays drained");
        assert_eq!(after(&["weight:150"]).weight(100), 150, "under the cap: as asked");
        assert_eq!(after(&["weight:7"]).weight(100), 7);
        // agent_absolute_weights = true: as asked.
        assert_eq!(s.weight_within(100, true), 10_000);
        assert_eq!(s.weight_within(0, true), 10_000);
        // Relative weights are bounded by the parser already, and the same either way.
        assert_eq!(after(&["256%"]).weight_within(100, true), 256);
    }

    #[test]
    fn agent_text_is_cleaned_and_capped() {
        let s = after(&["down #\u{1b}[2J\u{1b}]0;pwned\u{7}disk\rfull\u{9b}31m"]);
        let reason = s.down.expect("down");
        assert!(!reason.contains(char::is_control), "{reason:?}");
        assert_eq!(reason, "agent says down: [2J ]0;pwned disk full 31m");
        assert_eq!(clean("up\u{1b}[31m\tx\u{7f}"), "up [31m x ");
        // Capped on a character boundary: 'é' is 2 bytes, 256 / 2 = 128 of them fit.
        let long = "é".repeat(300);
        assert_eq!(clean(&long).len(), MAX_TEXT);
        assert_eq!(clean(&format!("a{long}")).len(), MAX_TEXT - 1);
        let reason = after(&[&format!("down #{}", "x".repeat(2000))]).down.unwrap();
        assert!(
            reason.len() <= "agent says down: ".len() + MAX_TEXT,
            "{}",
            reason.len()
        );
    }

    #[test]
    fn malformed_replies_change_nothing() {
        let s = after(&["50%"]);
        for bad in [
            "",
            "   ",
            "sleepy",
            "weight:x%",
            "maxconn:-1",
            "300%",
            "weight:99999",
            "drain bogus",
            ",",
        ] {
            let e = apply(&s, bad).expect_err(bad);
            assert!(!e.contains('\n') && !e.is_empty(), "{e}");
        }
    }
}
