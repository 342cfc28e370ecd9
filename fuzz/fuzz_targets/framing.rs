//! Arbitrary bytes as a client's HTTP/1 stream, split into two reads at a point the first byte
//! chooses: the framing watch must not panic, and where the reads split must not change which
//! requests it flags.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&cut, stream)) = data.split_first() else {
        return;
    };
    let at = usize::from(cut).min(stream.len());
    let whole = stickylb::framing::flagged(&[stream], 8192);
    let split = stickylb::framing::flagged(&[&stream[..at], &stream[at..]], 8192);
    assert_eq!(whole, split, "split at {at}");
});
