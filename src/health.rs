//! The pure health state machine: consecutive results in, transitions out. Probes, timers and
//! logging live in `heartbeat` and `backend`, so this stays a table to test.

use std::num::NonZeroU32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    Up,
    Down,
}

/// Tracks one backend: `fall` consecutive failures take an up backend down, `rise` consecutive
/// successes bring a down backend up. A backend starts up, so the proxy serves at once.
#[derive(Debug, Clone)]
pub struct HealthMachine {
    up: bool,
    /// Consecutive results that disagree with the current state.
    streak: u32,
    rise: u32,
    fall: u32,
}

impl HealthMachine {
    pub fn new(rise: NonZeroU32, fall: NonZeroU32) -> Self {
        Self {
            up: true,
            streak: 0,
            rise: rise.get(),
            fall: fall.get(),
        }
    }

    pub fn is_up(&self) -> bool {
        self.up
    }

    /// Feeds one heartbeat result.
    pub fn record(&mut self, ok: bool) -> Option<Transition> {
        if ok == self.up {
            self.streak = 0;
            return None;
        }
        self.streak += 1;
        let needed = if self.up { self.fall } else { self.rise };
        if self.streak < needed {
            return None;
        }
        self.streak = 0;
        self.up = ok;
        Some(if ok { Transition::Up } else { Transition::Down })
    }

    /// Passive failure (a refused connect): down at once; only heartbeats bring it back.
    pub fn force_down(&mut self) -> Option<Transition> {
        self.streak = 0;
        std::mem::replace(&mut self.up, false).then_some(Transition::Down)
    }

    /// Keeps the current state but adopts new thresholds (used when a reload changes them).
    pub fn set_thresholds(&mut self, rise: NonZeroU32, fall: NonZeroU32) {
        self.rise = rise.get();
        self.fall = fall.get();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Transition::{Down, Up};

    fn machine(rise: u32, fall: u32) -> HealthMachine {
        let nz = |n| NonZeroU32::new(n).expect("nonzero");
        HealthMachine::new(nz(rise), nz(fall))
    }

    /// rise, fall, results fed in order, expected transition after each result.
    type Row = (u32, u32, &'static [bool], &'static [Option<Transition>]);

    #[test]
    fn transitions_table() {
        let rows: &[Row] = &[
            (2, 2, &[true, true], &[None, None]),
            (2, 2, &[false], &[None]),
            (2, 2, &[false, false], &[None, Some(Down)]),
            (2, 2, &[false, true, false], &[None, None, None]),
            (
                2,
                2,
                &[false, false, true, true],
                &[None, Some(Down), None, Some(Up)],
            ),
            (
                2,
                2,
                &[false, false, true, false, true],
                &[None, Some(Down), None, None, None],
            ),
            (
                1,
                1,
                &[false, true, false],
                &[Some(Down), Some(Up), Some(Down)],
            ),
            (
                3,
                1,
                &[false, true, true, true],
                &[Some(Down), None, None, Some(Up)],
            ),
            (
                1,
                3,
                &[false, false, false, false],
                &[None, None, Some(Down), None],
            ),
        ];
        for (rise, fall, results, expected) in rows {
            let mut m = machine(*rise, *fall);
            let got: Vec<_> = results.iter().map(|&ok| m.record(ok)).collect();
            assert_eq!(
                &got, expected,
                "rise={rise} fall={fall} results={results:?}"
            );
        }
    }

    #[test]
    fn force_down_is_immediate_and_heartbeats_bring_it_back() {
        let mut m = machine(2, 3);
        assert_eq!(m.force_down(), Some(Down));
        assert_eq!(m.force_down(), None);
        assert!(!m.is_up());
        assert_eq!(m.record(true), None);
        assert_eq!(m.record(true), Some(Up));
    }

    #[test]
    fn force_down_resets_a_partial_rise() {
        let mut m = machine(2, 1);
        m.record(false);
        m.record(true);
        m.force_down();
        assert_eq!(m.record(true), None, "the earlier success must not count");
        assert_eq!(m.record(true), Some(Up));
    }
}
