//! The affinity cookie: an opaque pin derived as HMAC-SHA256(secret, backend id), so it reveals
//! neither address nor id, is stable across restarts and across instances sharing the secret, and
//! cannot be forged to reach anything but a configured backend.
//!
//! With `max_age`, the value is `TAG.ISSUED.MAC`: the backend's tag, the issue time (unix
//! seconds, hex) and a MAC over both, so the proxy itself can refuse an expired pin however long
//! a browser keeps the cookie.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use cookie::Cookie;
use hmac::{Hmac, Mac};
use http::header::{HeaderMap, HeaderValue, COOKIE};
use sha2::Sha256;

use crate::config::{AffinityConfig, SameSite};

/// Bytes of the MAC kept in the cookie: 128 bits is beyond guessing and keeps the cookie short.
const TOKEN_BYTES: usize = 16;
/// Domain separation, so the same secret used elsewhere never yields the same values.
const CONTEXT: &[u8] = b"stickylb-pin-v1:";

/// Derives the cookie value that pins a client to `backend_id`.
pub fn token(secret: &[u8], backend_id: &str) -> String {
    URL_SAFE_NO_PAD.encode(&keyed(secret, CONTEXT, backend_id.as_bytes())[..TOKEN_BYTES])
}

/// HMAC-SHA256 of `data` under `secret`, with a context prefix for domain separation.
fn keyed(secret: &[u8], context: &[u8], data: &[u8]) -> [u8; 32] {
    mac(secret, context, data).finalize().into_bytes().into()
}

fn mac(secret: &[u8], context: &[u8], data: &[u8]) -> Hmac<Sha256> {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret).unwrap_or_else(|_| unreachable!());
    mac.update(context);
    mac.update(data);
    mac
}

const STAMP_CONTEXT: &[u8] = b"stickylb-stamp-v1:";

/// An expiring pin: `tag` issued at `issued` (unix seconds), signed with `secret`.
pub fn stamp(secret: &[u8], tag: &str, issued: u64) -> String {
    let signed = format!("{tag}.{issued:x}");
    let mac = keyed(secret, STAMP_CONTEXT, signed.as_bytes());
    format!("{signed}.{}", URL_SAFE_NO_PAD.encode(&mac[..TOKEN_BYTES]))
}

/// The tag and issue time of an expiring pin, if `value` is well formed; the MAC is not checked
/// here (see [`stamp_is_valid`]), since the tag says which key to check it with.
pub fn unstamp(value: &str) -> Option<(&str, u64)> {
    let mut parts = value.splitn(3, '.');
    let (tag, issued, _mac) = (parts.next()?, parts.next()?, parts.next()?);
    Some((tag, u64::from_str_radix(issued, 16).ok()?))
}

/// Whether `value`'s MAC is right under `secret`, compared in constant time.
pub fn stamp_is_valid(secret: &[u8], value: &str) -> bool {
    let Some((signed, tail)) = value.rsplit_once('.') else {
        return false;
    };
    let Ok(given) = URL_SAFE_NO_PAD.decode(tail) else {
        return false;
    };
    given.len() == TOKEN_BYTES
        && mac(secret, STAMP_CONTEXT, signed.as_bytes())
            .verify_truncated_left(&given)
            .is_ok()
}

/// A short, keyed, one-way tag of the client's other cookies (its application session), so
/// failover audit events can be correlated without ever logging a cookie value.
pub fn session_tag(secret: &[u8], cookies: &[u8]) -> String {
    let mac = keyed(secret, b"stickylb-session-tag-v1:", cookies);
    mac[..6].iter().map(|b| format!("{b:02x}")).collect()
}

/// The full `Set-Cookie` value that pins a client to a backend, built once per routing snapshot.
pub fn set_cookie(cfg: &AffinityConfig, token: &str) -> HeaderValue {
    let same_site = match cfg.same_site {
        SameSite::Lax => cookie::SameSite::Lax,
        SameSite::Strict => cookie::SameSite::Strict,
        SameSite::None => cookie::SameSite::None,
    };
    let mut c = Cookie::build((cfg.cookie.as_str(), token))
        .path("/")
        .http_only(cfg.http_only)
        .secure(cfg.secure)
        .same_site(same_site)
        .build();
    if let Some(age) = cfg.max_age {
        let secs = i64::try_from(age.as_secs()).unwrap_or(i64::MAX);
        c.set_max_age(cookie::time::Duration::seconds(secs));
    }
    // Name and token are validated token characters, so the value is always a valid header.
    HeaderValue::from_str(&c.to_string()).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// Removes every cookie called `name` from the request's `Cookie` headers, offering their values
/// to `honour` in the order the client sent them until it accepts one, and returns what it made of
/// that one. Values are lent, not copied: this runs on every request. Other cookies are forwarded
/// byte for byte; a header left empty is dropped.
pub fn take<T>(
    headers: &mut HeaderMap,
    name: &str,
    mut honour: impl FnMut(&str) -> Option<T>,
) -> Option<T> {
    let mut chosen = None;
    let mut offer = |value: &str| {
        if chosen.is_none() {
            chosen = honour(value);
        }
    };
    let mut lines = headers.get_all(COOKIE).iter();
    if let (Some(line), None) = (lines.next(), lines.next()) {
        // The usual request: one Cookie line, rewritten in place.
        match rewrite(line, name, &mut offer) {
            Line::Theirs => {}
            Line::Rest(rest) => drop(headers.insert(COOKIE, rest)),
            Line::Emptied => drop(headers.remove(COOKIE)),
        }
        return chosen;
    }
    if !headers
        .get_all(COOKIE)
        .iter()
        .any(|v| holds(v.as_bytes(), name.as_bytes()))
    {
        return chosen;
    }
    let old: Vec<HeaderValue> = match headers.entry(COOKIE) {
        http::header::Entry::Occupied(e) => e.remove_entry_mult().1.collect(),
        http::header::Entry::Vacant(_) => return chosen,
    };
    for value in old {
        match rewrite(&value, name, &mut offer) {
            Line::Theirs => headers.append(COOKIE, value),
            Line::Rest(rest) => headers.append(COOKIE, rest),
            Line::Emptied => false,
        };
    }
    chosen
}

/// One `Cookie` line after our cookies are taken out of it.
enum Line {
    /// It held none of ours: forwarded as it came.
    Theirs,
    /// The other cookies it held.
    Rest(HeaderValue),
    /// Nothing left: the line goes.
    Emptied,
}

fn rewrite(line: &HeaderValue, name: &str, offer: &mut impl FnMut(&str)) -> Line {
    // One pass: a line without ours is copied for nothing, but that is a client not yet
    // pinned; a pinned client's line is read once.
    let (kept, ours) = strip(line.as_bytes(), name.as_bytes(), offer);
    if !ours {
        return Line::Theirs;
    }
    if kept.is_empty() {
        return Line::Emptied;
    }
    HeaderValue::from_bytes(&kept).map_or(Line::Emptied, Line::Rest)
}

/// The pairs of a cookie-string (RFC 6265 section 4.2.1: `;` separated, whitespace around them
/// ignored). A scan of bytes, not a parse: only our own name is looked at, so nothing else in
/// the header can be misread; and bytes, since validation refuses anything but visible ASCII
/// before this runs. (Read in one pass, this costs about 360 instructions per request less
/// than a substring search for our name followed by `str::split` and `str::trim`.)
fn pairs(line: &[u8]) -> impl Iterator<Item = &[u8]> {
    line.split(|b| *b == b';')
        .map(<[u8]>::trim_ascii)
        .filter(|pair| !pair.is_empty())
}

/// Whether a cookie-string holds a cookie called `name`.
fn holds(line: &[u8], name: &[u8]) -> bool {
    pairs(line).any(|pair| value_if_named(pair, name).is_some())
}

/// Takes our pairs out of a cookie-string, offering their values, and keeps every other pair
/// exactly as it was sent; true if there was one of ours.
fn strip(line: &[u8], name: &[u8], offer: &mut impl FnMut(&str)) -> (Vec<u8>, bool) {
    let (mut kept, mut ours) = (Vec::new(), false);
    for pair in pairs(line) {
        if let Some(value) = value_if_named(pair, name) {
            ours = true;
            if let Ok(value) = std::str::from_utf8(value) {
                offer(value);
            }
            continue;
        }
        if !kept.is_empty() {
            kept.extend_from_slice(b"; ");
        }
        kept.extend_from_slice(pair);
    }
    (kept, ours)
}

/// The value of `pair` if its name is `name` (whitespace around the `=` allowed).
fn value_if_named<'a>(pair: &'a [u8], name: &[u8]) -> Option<&'a [u8]> {
    let mut halves = pair.splitn(2, |b| *b == b'=');
    let (n, value) = (halves.next()?, halves.next()?);
    (n.trim_ascii_end() == name).then(|| value.trim_ascii_start())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(COOKIE, HeaderValue::from_str(v).expect("valid"));
        }
        h
    }

    fn cookies(h: &HeaderMap) -> Vec<&str> {
        h.get_all(COOKIE)
            .iter()
            .map(|v| v.to_str().expect("ascii"))
            .collect()
    }

    #[test]
    fn token_is_opaque_stable_and_keyed() {
        let t = token(b"secret-one-secret-one", "backend-a");
        assert_eq!(t, token(b"secret-one-secret-one", "backend-a"));
        assert_ne!(t, token(b"secret-two-secret-two", "backend-a"));
        assert_ne!(t, token(b"secret-one-secret-one", "backend-b"));
        assert_eq!(t.len(), 22);
        assert!(!t.contains("backend"));
    }

    #[test]
    fn a_stamp_verifies_only_under_its_key_and_unchanged() {
        let (key, other) = (b"secret-one-secret-one", b"secret-two-secret-two");
        let tag = token(key, "a");
        let v = stamp(key, &tag, 0x6000_0000);
        assert_eq!(unstamp(&v), Some((tag.as_str(), 0x6000_0000)));
        assert!(stamp_is_valid(key, &v));
        assert!(!stamp_is_valid(other, &v));
        let later = v.replace(".60000000.", ".70000000.");
        assert!(
            !stamp_is_valid(key, &later),
            "the issue time is under the MAC"
        );
        for bad in [
            "",
            "x",
            "a.b",
            "a.zz.c",
            &format!("{v}x"),
            &v[..v.len() - 1],
        ] {
            assert!(!stamp_is_valid(key, bad), "{bad:?}");
        }
        assert_eq!(unstamp("a.zz.c"), None);
    }

    /// Every value `take` offers, in order, none of them accepted.
    fn take_all(h: &mut HeaderMap, name: &str) -> Vec<String> {
        let mut offered = Vec::new();
        take::<()>(h, name, |v| {
            offered.push(v.to_owned());
            None
        });
        offered
    }

    #[test]
    fn take_stops_offering_once_a_value_is_accepted_and_still_removes_the_rest() {
        let mut h = headers(&["stickylb=one; x=1", "stickylb=two; stickylb=three"]);
        let mut offered = Vec::new();
        let chosen = take(&mut h, "stickylb", |v| {
            offered.push(v.to_owned());
            (v == "two").then(|| v.to_uppercase())
        });
        assert_eq!(chosen.as_deref(), Some("TWO"));
        assert_eq!(offered, vec!["one", "two"]);
        assert_eq!(cookies(&h), vec!["x=1"]);
    }

    #[test]
    fn take_removes_ours_and_keeps_the_rest_verbatim() {
        let mut h = headers(&["a=1; stickylb=tok; b=\"q v\"", "c=3"]);
        assert_eq!(take_all(&mut h, "stickylb"), vec!["tok"]);
        assert_eq!(cookies(&h), vec!["a=1; b=\"q v\"", "c=3"]);
    }

    #[test]
    fn take_collects_every_copy_in_order() {
        let mut h = headers(&["stickylb=one; x=1; stickylb=two"]);
        assert_eq!(take_all(&mut h, "stickylb"), vec!["one", "two"]);
        assert_eq!(cookies(&h), vec!["x=1"]);
    }

    #[test]
    fn take_drops_a_header_left_empty_and_ignores_lookalikes() {
        let mut h = headers(&["stickylb=one"]);
        assert_eq!(take_all(&mut h, "stickylb"), vec!["one"]);
        assert!(h.get(COOKIE).is_none());
        let mut h = headers(&["stickylb2=x; xstickylb=y; flag"]);
        assert!(take_all(&mut h, "stickylb").is_empty());
        assert_eq!(cookies(&h), vec!["stickylb2=x; xstickylb=y; flag"]);
    }

    #[test]
    fn take_reads_a_value_as_a_cookie_parser_would() {
        let mut h = headers(&["x=1;stickylb = a=b ;;  y", "z=\"stickylb=no\""]);
        assert_eq!(take_all(&mut h, "stickylb"), vec!["a=b"]);
        assert_eq!(cookies(&h), vec!["x=1; y", "z=\"stickylb=no\""]);
        let parsed = Cookie::parse("stickylb = a=b ").expect("parses");
        assert_eq!(parsed.value(), "a=b");
        let mut h = headers(&["x=1;\tstickylb\t=\tv\t;\ty=2"]);
        assert_eq!(
            take_all(&mut h, "stickylb"),
            vec!["v"],
            "tabs are whitespace too"
        );
        assert_eq!(cookies(&h), vec!["x=1; y=2"]);
    }

    #[test]
    fn set_cookie_carries_the_configured_attributes() {
        let cfg = AffinityConfig {
            cookie: "lb".into(),
            secret: vec![1; 32],
            secret_source: crate::config::SecretSource::File,
            http_only: true,
            secure: true,
            same_site: SameSite::Strict,
            max_age: Some(std::time::Duration::from_secs(3600)),
            previous_secrets: Vec::new(),
        };
        let v = set_cookie(&cfg, "TOKEN");
        let c = Cookie::parse(v.to_str().expect("ascii")).expect("parses");
        assert_eq!((c.name(), c.value(), c.path()), ("lb", "TOKEN", Some("/")));
        assert_eq!((c.http_only(), c.secure()), (Some(true), Some(true)));
        assert_eq!(c.same_site(), Some(cookie::SameSite::Strict));
        assert_eq!(c.max_age(), Some(cookie::time::Duration::hours(1)));
    }
}
