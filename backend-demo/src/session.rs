//! What a session is: a visit counter with a version that only grows, and an unguessable id.

use rand::rngs::OsRng;
use rand::RngCore;

/// The replicated part of a session.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Record {
    pub visits: u64,
    /// Number of updates ever applied; each store write must name the version it replaces.
    pub version: u64,
}

/// A new session id: 128 bits from the operating system's CSPRNG, as 32 hex digits.
pub fn new_id() -> String {
    let mut bytes = [0u8; 16];
    OsRng.fill_bytes(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Ids we issue are 32 lowercase hex digits; anything else is not worth a store lookup.
pub fn is_well_formed(id: &str) -> bool {
    id.len() == 32
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_unique_and_well_formed() {
        let (a, b) = (new_id(), new_id());
        assert_ne!(a, b);
        assert!(is_well_formed(&a) && is_well_formed(&b));
        assert!(!is_well_formed("../../etc") && !is_well_formed(&a.to_uppercase()));
    }
}
