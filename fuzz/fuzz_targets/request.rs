//! Arbitrary bytes as a request head: whatever parses must go through request validation, the
//! affinity cookie extraction and pin parsing without a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut head = httparse::Request::new(&mut headers);
    let Ok(httparse::Status::Complete(_)) = head.parse(data) else {
        return;
    };
    let mut req = http::Request::builder()
        .method(head.method.unwrap_or("GET"))
        .uri(head.path.unwrap_or("/"));
    for h in head.headers.iter() {
        req = req.header(h.name, h.value);
    }
    let Ok(req) = req.body(()) else {
        return;
    };
    let (mut parts, ()) = req.into_parts();
    // The verdict itself is covered by the unit and adversarial tests; here it must not panic.
    std::hint::black_box(stickylb::validate::check(&parts).is_ok());
    let before = parts.headers.get_all(http::header::COOKIE).iter().count();
    stickylb::affinity::take::<()>(&mut parts.headers, "stickylb", |value| {
        let valid = stickylb::affinity::stamp_is_valid(b"fuzz-secret-0123456789", value);
        // A value that verifies is well formed, and its tag is where it starts.
        if valid {
            let (tag, _issued) = stickylb::affinity::unstamp(value).expect("valid means parsable");
            assert!(value.starts_with(tag));
        }
        None
    });
    // Taking our cookie never adds Cookie lines.
    assert!(parts.headers.get_all(http::header::COOKIE).iter().count() <= before);
});
