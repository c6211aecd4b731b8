//! The run / stage / batch ledger (`rekey.runs`, `rekey.stages`, `rekey.batches`): the truth
//! about a run's progress, and the owner of its three state machines. Every statement that
//! changes a run's, a stage's or a batch's state is a named transition here, called by the
//! coordinator and the worker alike; the database refuses any other change too (migration
//! V7, a trigger reading `rekey.state_transitions`, which a test holds equal to the tables
//! below).
//!
//! Legal transitions (staying in a state is always legal):
//!
//! | machine | from | to |
//! | --- | --- | --- |
//! | run | planning | running, failed |
//! | run | running | paused, halted, completed, failed |
//! | run | paused | running, halted |
//! | run | halted | running, rolled_back |
//! | run | completed | rolled_back |
//! | stage | pending | running |
//! | stage | running | gating, breached |
//! | stage | gating | running, observing, breached |
//! | stage | observing | passed, breached |
//! | stage | breached | running |
//! | batch | pending | published, done, failed |
//! | batch | published | pending, done, failed |
//! | batch | failed | pending |
//!
//! A run is created `planning`, a stage and a batch `pending`. No transition leaves
//! `failed` and `rolled_back` (runs), `passed` (stages) or `done` (batches); a `completed`
//! run is over but can still be rolled back.
//!
//! Who moves what: the coordinator plans (`create_run`, `create_stages`, `insert_batches`),
//! publishes ([`publish_next`]), expires leases ([`expire_leases`]), drives stages
//! ([`start_stage`] … [`pass_stage`], [`breach_stage`]) and runs ([`set_run_state`]); a
//! worker claims ([`claim`]), hands back ([`hand_back`]), finishes ([`mark_done`]) or gives
//! up on ([`mark_failed`]) one batch, in the transaction that rotates its rows; `resume`
//! makes what is left runnable again ([`reopen_batches`], [`rerun_breached`]).

mod batches;
mod presence;
mod runs;
mod stages;

pub use batches::*;
pub use presence::*;
pub use runs::*;
pub use stages::*;

/// A state machine of the ledger: its states, their SQL text, and its legal transitions.
pub trait StateMachine: Copy + Eq + std::fmt::Debug + 'static {
    /// `run`, `stage` or `batch`, as errors and `rekey.state_transitions` name it.
    const MACHINE: &'static str;
    /// Every state.
    const ALL: &'static [Self];
    /// The state a new row starts in.
    const INITIAL: Self;
    /// The legal changes of state, besides staying.
    const TRANSITIONS: &'static [(Self, Self)];

    /// The state's text in the database.
    fn as_str(self) -> &'static str;

    fn parse(s: &str) -> Option<Self> {
        Self::ALL.iter().copied().find(|x| x.as_str() == s)
    }

    /// Whether a row in this state may move to `to`.
    fn can_become(self, to: Self) -> bool {
        self == to || Self::TRANSITIONS.contains(&(self, to))
    }

    /// Whether no transition leaves this state.
    fn is_terminal(self) -> bool {
        !Self::TRANSITIONS.iter().any(|(f, _)| *f == self)
    }

    /// `from`'s and `to`'s text for a statement that moves `from` to `to`; checks that the
    /// move is in the table (the named transitions below use nothing else).
    fn edge(from: Self, to: Self) -> (&'static str, &'static str) {
        debug_assert!(
            from.can_become(to),
            "{from:?} -> {to:?} is not a legal transition"
        );
        (from.as_str(), to.as_str())
    }
}

/// Why the ledger refused or failed to change a row.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("illegal {machine} state change for {what}: {from} -> {to}")]
    Illegal {
        machine: &'static str,
        what: String,
        from: &'static str,
        to: &'static str,
    },
    #[error("no {0} in the ledger")]
    NotFound(String),
    #[error("{what} in the ledger cannot be read: {error}")]
    Unreadable { what: String, error: String },
    #[error("the ledger holds {machine} state {text:?}, which this rekey does not know")]
    Unknown { machine: &'static str, text: String },
    #[error(transparent)]
    Db(#[from] tokio_postgres::Error),
}

/// Reads a state column's text.
pub(crate) fn state_of<S: StateMachine>(text: &str) -> Result<S, LedgerError> {
    S::parse(text).ok_or_else(|| LedgerError::Unknown {
        machine: S::MACHINE,
        text: text.to_owned(),
    })
}

/// Refuses `from -> to` unless the table allows it.
pub(crate) fn check<S: StateMachine>(what: String, from: S, to: S) -> Result<(), LedgerError> {
    if from.can_become(to) {
        Ok(())
    } else {
        Err(LedgerError::Illegal {
            machine: S::MACHINE,
            what,
            from: from.as_str(),
            to: to.as_str(),
        })
    }
}

/// Declares a state enum with its text, `ALL`, `Display` and serde names.
macro_rules! state_enum {
    ($(#[$m:meta])* $name:ident { $($(#[$vm:meta])* $var:ident = $text:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
        #[serde(rename_all = "snake_case")]
        pub enum $name { $($(#[$vm])* $var),+ }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$var),+];
            /// The text the database and the reports use.
            pub fn as_str(self) -> &'static str {
                match self { $($name::$var => $text),+ }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.pad(self.as_str())
            }
        }
    };
}
pub(crate) use state_enum;

/// Implements [`StateMachine`] for a state enum.
macro_rules! state_machine {
    ($name:ident, $machine:literal, initial = $initial:ident, [$(($from:ident, $to:ident)),+ $(,)?]) => {
        impl $crate::ledger::StateMachine for $name {
            const MACHINE: &'static str = $machine;
            const ALL: &'static [Self] = $name::ALL;
            const INITIAL: Self = $name::$initial;
            const TRANSITIONS: &'static [(Self, Self)] = &[$(($name::$from, $name::$to)),+];
            fn as_str(self) -> &'static str {
                $name::as_str(self)
            }
        }
    };
}
pub(crate) use state_machine;

#[cfg(test)]
mod tests {
    use super::*;

    /// The module docs' table, read back.
    fn documented() -> Vec<(String, String, String)> {
        let doc = include_str!("mod.rs");
        let mut out = Vec::new();
        for line in doc.lines().filter_map(|l| l.strip_prefix("//! | ")) {
            let cells: Vec<&str> = line.trim_end_matches(" |").split(" | ").collect();
            if cells.len() != 3 || cells[0] == "machine" || cells[0].starts_with("---") {
                continue;
            }
            for to in cells[2].split(", ") {
                out.push((cells[0].to_owned(), cells[1].to_owned(), to.to_owned()));
            }
        }
        out.sort();
        out
    }

    fn table<S: StateMachine>() -> Vec<(String, String, String)> {
        S::TRANSITIONS
            .iter()
            .map(|(f, t)| {
                (
                    S::MACHINE.to_owned(),
                    f.as_str().to_owned(),
                    t.as_str().to_owned(),
                )
            })
            .collect()
    }

    /// Every transition of the three machines, as `rekey.state_transitions` must hold them.
    pub(crate) fn all_transitions() -> Vec<(String, String, String)> {
        let mut all = table::<RunState>();
        all.extend(table::<StageState>());
        all.extend(table::<BatchState>());
        all.sort();
        all
    }

    #[test]
    fn the_documented_table_is_the_code_s_table() {
        assert_eq!(documented(), all_transitions());
    }

    #[test]
    fn terminal_states_are_the_documented_ones() {
        let finals = |v: Vec<&'static str>| v;
        assert_eq!(
            finals(
                RunState::ALL
                    .iter()
                    .filter(|s| StateMachine::is_terminal(**s))
                    .map(|s| s.as_str())
                    .collect()
            ),
            ["failed", "rolled_back"]
        );
        assert_eq!(
            finals(
                StageState::ALL
                    .iter()
                    .filter(|s| StateMachine::is_terminal(**s))
                    .map(|s| s.as_str())
                    .collect()
            ),
            ["passed"]
        );
        assert_eq!(
            finals(
                BatchState::ALL
                    .iter()
                    .filter(|s| StateMachine::is_terminal(**s))
                    .map(|s| s.as_str())
                    .collect()
            ),
            ["done"]
        );
    }

    #[test]
    fn every_state_parses_back_and_nothing_else_does() {
        for s in RunState::ALL {
            assert_eq!(<RunState as StateMachine>::parse(s.as_str()), Some(*s));
        }
        for s in StageState::ALL {
            assert_eq!(<StageState as StateMachine>::parse(s.as_str()), Some(*s));
        }
        for s in BatchState::ALL {
            assert_eq!(<BatchState as StateMachine>::parse(s.as_str()), Some(*s));
        }
        assert_eq!(<BatchState as StateMachine>::parse("cancelled"), None);
        assert!(matches!(
            state_of::<RunState>("cancelled"),
            Err(LedgerError::Unknown { machine: "run", .. })
        ));
    }
}
