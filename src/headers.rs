//! Request and response header hygiene for a proxy hop: hop-by-hop headers out, forwarding
//! headers in.

use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;

use crate::config::ForwardingConfig;

/// Tells the backend that the client was pinned to another backend that is now unusable, so it
/// can pull the session from the shared store before handling the request.
pub const FAILOVER: HeaderName = HeaderName::from_static("x-stickylb-failover");
pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
pub const X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");

/// Headers that describe one connection, not the message (RFC 9110 section 7.6.1), and `Upgrade`,
/// which is put back only for a switch this proxy relays.
/// Whether a header is hop-by-hop by its name alone (not counting what `Connection` names).
pub(crate) fn is_hop_by_hop(name: &HeaderName) -> bool {
    is_hop_by_hop_name(name.as_str().as_bytes())
}

fn is_hop_by_hop_name(lower_case: &[u8]) -> bool {
    matches!(
        lower_case,
        b"connection"
            | b"keep-alive"
            | b"proxy-connection"
            | b"proxy-authenticate"
            | b"proxy-authorization"
            | b"te"
            | b"trailer"
            | b"transfer-encoding"
            | b"upgrade"
    )
}

/// Whether a header name or `Connection` token, in any case, is hop-by-hop (`keep-alive`, say).
/// Public so code reading raw heads (the bench's `examples/raw_work.rs`) uses the same list.
pub fn names_hop_by_hop(token: &[u8]) -> bool {
    // Most names are none of those lengths, and are not copied (435 instructions per request
    // fewer); the lengths are held to the list by test `every_hop_by_hop_name_is_known_in_any_case`.
    if !matches!(token.len(), 2 | 7 | 10 | 16..=19) {
        return false;
    }
    let mut lower = [0u8; "proxy-authorization".len()];
    let lower = &mut lower[..token.len()];
    lower.copy_from_slice(token);
    lower.make_ascii_lowercase();
    is_hop_by_hop_name(lower)
}

/// The comma-separated tokens of every `name` line, trimmed (`Connection`, `Transfer-Encoding`).
/// Non-ASCII lines are skipped; validation refuses them anyway.
pub fn list_tokens<'a>(h: &'a HeaderMap, name: &HeaderName) -> impl Iterator<Item = &'a str> {
    h.get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(tokens)
}

/// The comma-separated tokens of one header line, trimmed.
pub fn tokens(line: &str) -> impl Iterator<Item = &str> {
    line.split(',').map(str::trim)
}

/// [`tokens`] of a line read as bytes, not known to be text.
pub fn byte_tokens(line: &[u8]) -> impl Iterator<Item = &[u8]> {
    line.split(|b| *b == b',').map(<[u8]>::trim_ascii)
}

/// Removes hop-by-hop headers, including every header the `Connection` header names. Looks
/// first at which are present (a message has few names), so the common request costs one pass
/// and no removal, and the common response (`Connection: keep-alive` alone) one removal and no
/// allocation. Otherwise only a named header that is present (and not hop-by-hop anyway) is
/// copied out before removal.
pub fn remove_hop_by_hop(headers: &mut HeaderMap) {
    let mut present = headers.keys().filter(|k| is_hop_by_hop(k));
    let Some(first) = present.next() else {
        return;
    };
    // The usual backend response: `Connection: keep-alive` alone, naming nothing else to remove.
    let only_connection = *first == header::CONNECTION && present.next().is_none();
    if only_connection && connection_names_only_hop_by_hop(headers) {
        headers.remove(header::CONNECTION);
        return;
    }
    let named: Vec<HeaderName> = list_tokens(headers, &header::CONNECTION)
        .filter(|token| !names_hop_by_hop(token.as_bytes()) && headers.contains_key(*token))
        .filter_map(|token| HeaderName::from_bytes(token.as_bytes()).ok())
        .collect();
    while let Some(name) = headers.keys().find(|k| is_hop_by_hop(k)).cloned() {
        headers.remove(&name);
    }
    for name in &named {
        headers.remove(name);
    }
}

/// Whether every `Connection` token names a hop-by-hop header. A lone `keep-alive` line (nearly
/// every backend response) is compared whole, before any splitting into tokens: about 430
/// instructions per request less.
fn connection_names_only_hop_by_hop(headers: &HeaderMap) -> bool {
    let mut lines = headers.get_all(header::CONNECTION).iter();
    if let (Some(line), None) = (lines.next(), lines.next()) {
        if line.as_bytes().eq_ignore_ascii_case(b"keep-alive") {
            return true;
        }
    }
    list_tokens(headers, &header::CONNECTION).all(|t| names_hop_by_hop(t.as_bytes()))
}

/// Puts back the two headers hop-by-hop removal took, for a request or a 101 that switches.
pub fn keep_upgrade(headers: &mut HeaderMap, protocol: HeaderValue) {
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, protocol);
}

/// The client's address, and its header value formatted once per connection, not per request.
#[derive(Debug, Clone)]
pub struct Peer {
    pub ip: IpAddr,
    value: HeaderValue,
}

impl Peer {
    pub fn new(ip: IpAddr) -> Self {
        Self {
            ip,
            value: HeaderValue::from(IpHeader(ip)),
        }
    }
}

/// What this hop knows about the client's connection.
pub struct Hop<'a> {
    pub peer: &'a Peer,
    /// `http` or `https`, as the client connected.
    pub proto: &'static str,
    pub forwarding: &'a ForwardingConfig,
}

/// The forwarding headers, in the order they are added.
static FORWARDING: [HeaderName; FORWARDING_HEADERS] = [
    X_FORWARDED_FOR,
    X_REAL_IP,
    X_FORWARDED_PROTO,
    X_FORWARDED_HOST,
    header::FORWARDED,
];

/// How many headers [`prepare_request`] may add.
const FORWARDING_HEADERS: usize = 5;

/// The forwarding headers this hop adds to a request, worked out once for all its attempts, and
/// added by each attempt's transport: the wire writes them behind the client's lines, hyper's
/// client inserts them into the map it sends. Inserted into the request's own map they cost
/// five hashed insertions per request (about 1,000 instructions).
#[derive(Debug, Default)]
pub struct Forwarding {
    /// By [`FORWARDING`]'s order; None where nothing is added (a trusted proxy's own is kept).
    values: [Option<HeaderValue>; FORWARDING_HEADERS],
}

impl Forwarding {
    pub fn iter(&self) -> impl Iterator<Item = (&HeaderName, &HeaderValue)> {
        let values = self.values.iter();
        FORWARDING
            .iter()
            .zip(values)
            .filter_map(|(n, v)| Some((n, v.as_ref()?)))
    }

    /// Adds them to `h`, which holds none of them (see [`prepare_request`]).
    pub fn add_to(&self, h: &mut HeaderMap) {
        for (name, value) in self.iter() {
            h.append(name.clone(), value.clone());
        }
    }
}

/// Prepares a client request for the backend: Host preserved (taken from the HTTP/2 authority if
/// needed), hop-by-hop headers removed, and the forwarding headers (`X-Forwarded-For`, `-Proto`,
/// `-Host`, `X-Real-IP`, and `Forwarded` when enabled) worked out, to be added by the transport
/// (the map keeps none it replaces). From an untrusted peer whatever it sent in them is replaced
/// with what this proxy saw: a client could write anything there. From a trusted proxy the chain
/// is extended and its view of proto, host and client is kept. `host` is the request's one
/// `Host` line, as validation found it.
pub fn prepare_request(parts: &mut Parts, hop: &Hop<'_>, host: Option<HeaderValue>) -> Forwarding {
    remove_hop_by_hop(&mut parts.headers);
    let host = host.or_else(|| host_from_authority(parts));
    let h = &mut parts.headers;
    if hop.forwarding.trusts(hop.peer.ip) {
        extend_forwarding(h, hop, host)
    } else {
        replace_forwarding(h, hop, host)
    }
}

/// For a request without `Host` (HTTP/2 sends `:authority`): one made from the authority.
fn host_from_authority(parts: &mut Parts) -> Option<HeaderValue> {
    let authority = parts.uri.authority()?;
    let host = HeaderValue::from_str(authority.as_str()).ok()?;
    parts.headers.insert(header::HOST, host.clone());
    Some(host)
}

/// From a trusted proxy: its chains are extended and its view of proto, host and client kept.
fn extend_forwarding(h: &mut HeaderMap, hop: &Hop<'_>, host: Option<HeaderValue>) -> Forwarding {
    let peer = &hop.peer.value;
    let forwarded = hop.forwarding.forwarded || h.contains_key(header::FORWARDED);
    let element = forwarded.then(|| forwarded_element(hop, host.as_ref()));
    // A trusted proxy's own view of the client, proto and host is kept.
    let unless_sent =
        |name: HeaderName, value: Option<HeaderValue>| value.filter(|_| !h.contains_key(name));
    let real_ip = unless_sent(X_REAL_IP, Some(peer.clone()));
    let proto = unless_sent(X_FORWARDED_PROTO, Some(HeaderValue::from_static(hop.proto)));
    let host = unless_sent(X_FORWARDED_HOST, host);
    let chain_for = append_to_chain(h, &X_FORWARDED_FOR, peer);
    let chain = element.and_then(|e| append_to_chain(h, &header::FORWARDED, &e));
    Forwarding {
        values: [chain_for, real_ip, proto, host, chain],
    }
}

/// From anyone else: whatever the client wrote in the forwarding headers is replaced. The map is
/// looked through once for them: a client seldom sends any, and each removal hashes a name.
fn replace_forwarding(h: &mut HeaderMap, hop: &Hop<'_>, host: Option<HeaderValue>) -> Forwarding {
    if h.keys().any(|k| FORWARDING.contains(k)) {
        for name in &FORWARDING {
            h.remove(name);
        }
    }
    let element = hop
        .forwarding
        .forwarded
        .then(|| forwarded_element(hop, host.as_ref()));
    let peer = &hop.peer.value;
    Forwarding {
        values: [
            Some(peer.clone()),
            Some(peer.clone()),
            Some(HeaderValue::from_static(hop.proto)),
            host,
            element,
        ],
    }
}

/// `existing, value` as one header (all copies joined, and taken out of the map), or `value`
/// when there was none.
fn append_to_chain(
    h: &mut HeaderMap,
    name: &HeaderName,
    value: &HeaderValue,
) -> Option<HeaderValue> {
    let prior: Vec<&[u8]> = h.get_all(name).iter().map(HeaderValue::as_bytes).collect();
    let mut joined = prior.join(&b", "[..]);
    if !joined.is_empty() {
        joined.extend_from_slice(b", ");
    }
    joined.extend_from_slice(value.as_bytes());
    // Joined from valid values with ", ": still a valid value.
    let joined = HeaderValue::from_bytes(&joined).ok()?;
    h.remove(name);
    Some(joined)
}

/// One RFC 7239 element: `for=...;proto=...;host=...`, IPv6 bracketed and quoted, and a host
/// quoted when it is not a token (a port's colon).
fn forwarded_element(hop: &Hop<'_>, host: Option<&HeaderValue>) -> HeaderValue {
    let node = match hop.peer.ip {
        IpAddr::V4(ip) => ip.to_string(),
        IpAddr::V6(ip) => format!("\"[{ip}]\""),
    };
    let mut s = format!("for={node};proto={}", hop.proto);
    if let Some(host) = host.and_then(|h| h.to_str().ok()) {
        let token = host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~".contains(&b));
        let quote = |v: &str| format!("\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\""));
        let host = if token { host.to_string() } else { quote(host) };
        s.push_str(&format!(";host={host}"));
    }
    HeaderValue::from_str(&s).unwrap_or_else(|_| HeaderValue::from_static("for=unknown"))
}

struct IpHeader(IpAddr);

impl From<IpHeader> for HeaderValue {
    fn from(ip: IpHeader) -> Self {
        // An IP address prints as ASCII digits, dots, colons and hex: always a valid value.
        HeaderValue::from_str(&ip.0.to_string())
            .unwrap_or_else(|_| HeaderValue::from_static("unknown"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Request;

    fn parts(headers: &[(&str, &str)], uri: &str) -> Parts {
        let mut b = Request::builder().uri(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).expect("valid request").into_parts().0
    }

    #[test]
    fn every_hop_by_hop_name_is_known_in_any_case() {
        let hop = [
            "Connection",
            "KEEP-ALIVE",
            "proxy-connection",
            "Proxy-Authenticate",
            "proxy-AUTHORIZATION",
            "TE",
            "Trailer",
            "transfer-encoding",
            "Upgrade",
        ];
        for name in hop {
            assert!(names_hop_by_hop(name.as_bytes()), "{name}");
            let lower = name.to_ascii_lowercase();
            assert!(is_hop_by_hop_name(lower.as_bytes()), "{name}");
        }
        for name in [
            "Content-Length",
            "Date",
            "Cookie",
            "t",
            "Trailers",
            "upgrades",
            "",
        ] {
            assert!(!names_hop_by_hop(name.as_bytes()), "{name}");
        }
    }

    #[test]
    fn hop_by_hop_and_connection_named_headers_are_removed() {
        let mut p = parts(
            &[
                ("connection", "keep-alive, X-Secret, close"),
                ("x-secret", "1"),
                ("keep-alive", "timeout=5"),
                ("transfer-encoding", "chunked"),
                ("upgrade", "websocket"),
                ("te", "trailers"),
                ("x-kept", "yes"),
            ],
            "/",
        );
        remove_hop_by_hop(&mut p.headers);
        let left: Vec<_> = p.headers.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, vec!["x-kept"]);
    }

    #[test]
    fn connection_tokens_that_name_nothing_present_or_no_valid_name_remove_only_hop_by_hop() {
        let mut p = parts(
            &[
                ("Connection", "Keep-Alive, not a name, X-Absent"),
                ("Connection", "X-SECRET"),
                ("x-secret", "1"),
                ("content-length", "0"),
            ],
            "/",
        );
        remove_hop_by_hop(&mut p.headers);
        let left: Vec<_> = p.headers.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, vec!["content-length"]);
    }

    #[test]
    fn a_lone_connection_header_naming_only_hop_by_hop_headers_is_removed_and_nothing_else() {
        for (connection, others) in [
            ("Keep-Alive", vec![("x-kept", "1"), ("content-length", "2")]),
            (
                "close, KEEP-ALIVE",
                vec![("x-kept", "1"), ("content-length", "2")],
            ),
            (
                "keep-alive",
                vec![("x-kept", "1"), ("keep-alive", "timeout=5")],
            ),
        ] {
            let mut headers = vec![("connection", connection)];
            headers.extend(others);
            let mut p = parts(&headers, "/");
            remove_hop_by_hop(&mut p.headers);
            let mut left: Vec<_> = p.headers.keys().map(|k| k.as_str()).collect();
            let mut kept: Vec<_> = headers[1..]
                .iter()
                .map(|(name, _)| *name)
                .filter(|name| *name != "keep-alive")
                .collect();
            left.sort();
            kept.sort();
            assert_eq!(left, kept, "Connection: {connection}");
        }
    }

    #[test]
    fn keep_alive_with_another_token_or_another_connection_line_still_removes_what_they_name() {
        for connection in [
            &["keep-alive, X-Secret"][..],
            &["keep-alive", "X-Secret"][..],
        ] {
            let mut headers: Vec<_> = connection.iter().map(|c| ("connection", *c)).collect();
            headers.extend([("x-secret", "1"), ("content-length", "2")]);
            let mut p = parts(&headers, "/");
            remove_hop_by_hop(&mut p.headers);
            let left: Vec<_> = p.headers.keys().map(|k| k.as_str()).collect();
            assert_eq!(left, vec!["content-length"], "Connection: {connection:?}");
        }
    }

    fn hop(peer: &str, trusted: &[&str], forwarded: bool) -> (Peer, ForwardingConfig) {
        let forwarding = ForwardingConfig {
            trusted_proxies: trusted.iter().map(|n| n.parse().expect("cidr")).collect(),
            forwarded,
        };
        (Peer::new(peer.parse().expect("ip")), forwarding)
    }

    fn prepared(headers: &[(&str, &str)], peer: &str, trusted: &[&str], fwd: bool) -> HeaderMap {
        let mut p = parts(headers, "/");
        let (peer, forwarding) = hop(peer, trusted, fwd);
        let hop = Hop {
            peer: &peer,
            proto: "http",
            forwarding: &forwarding,
        };
        let host = p.headers.get(header::HOST).cloned();
        prepare_request(&mut p, &hop, host).add_to(&mut p.headers);
        p.headers
    }

    const CLAIMS: [(&str, &str); 6] = [
        ("host", "shop.example"),
        ("x-forwarded-for", "6.6.6.6"),
        ("x-forwarded-proto", "https"),
        ("x-forwarded-host", "evil.example"),
        ("x-real-ip", "6.6.6.6"),
        ("forwarded", "for=6.6.6.6"),
    ];

    fn get<'a>(h: &'a HeaderMap, name: &str) -> Vec<&'a str> {
        h.get_all(name)
            .iter()
            .map(|v| v.to_str().expect("ascii"))
            .collect()
    }

    #[test]
    fn an_untrusted_peer_gets_its_claims_replaced() {
        for trusted in [&[][..], &["10.0.0.0/8"][..]] {
            let h = prepared(&CLAIMS, "192.0.2.7", trusted, false);
            assert_eq!(get(&h, "x-forwarded-for"), ["192.0.2.7"]);
            assert_eq!(get(&h, "x-real-ip"), ["192.0.2.7"]);
            assert_eq!(get(&h, "x-forwarded-proto"), ["http"]);
            assert_eq!(get(&h, "x-forwarded-host"), ["shop.example"]);
            assert!(
                get(&h, "forwarded").is_empty(),
                "a spoofed Forwarded is dropped"
            );
        }
        let h = prepared(&CLAIMS, "192.0.2.7", &[], true);
        assert_eq!(
            get(&h, "forwarded"),
            ["for=192.0.2.7;proto=http;host=shop.example"]
        );
    }

    #[test]
    fn a_trusted_proxy_has_its_chain_extended_and_its_view_kept() {
        let h = prepared(&CLAIMS, "10.1.2.3", &["10.0.0.0/8"], false);
        assert_eq!(get(&h, "x-forwarded-for"), ["6.6.6.6, 10.1.2.3"]);
        assert_eq!(get(&h, "x-real-ip"), ["6.6.6.6"]);
        assert_eq!(get(&h, "x-forwarded-proto"), ["https"]);
        assert_eq!(get(&h, "x-forwarded-host"), ["evil.example"]);
        assert_eq!(
            get(&h, "forwarded"),
            ["for=6.6.6.6, for=10.1.2.3;proto=http;host=shop.example"]
        );
        let bare = prepared(&[("host", "a.example:8080")], "::1", &["::1/128"], true);
        assert_eq!(get(&bare, "x-forwarded-for"), ["::1"]);
        assert_eq!(get(&bare, "x-real-ip"), ["::1"]);
        assert_eq!(
            get(&bare, "forwarded"),
            ["for=\"[::1]\";proto=http;host=\"a.example:8080\""]
        );
    }

    #[test]
    fn http2_authority_becomes_host() {
        let mut p = parts(&[], "http://shop.example:8080/cart");
        let (peer, forwarding) = hop("::1", &[], false);
        let hop = Hop {
            peer: &peer,
            proto: "http",
            forwarding: &forwarding,
        };
        prepare_request(&mut p, &hop, None).add_to(&mut p.headers);
        assert_eq!(p.headers["host"], "shop.example:8080");
        assert_eq!(p.headers["x-forwarded-for"], "::1");
    }
}
