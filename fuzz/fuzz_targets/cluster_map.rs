//! The cluster map's text, as a worker takes it from the network (`map set`): any bytes parse
//! or are refused without a panic, a map that parses reads back the same from its own text,
//! and what each of its pairs may serve is computed without one.
#![no_main]

use libfuzzer_sys::fuzz_target;
use twincache_protocol::cluster_map::{ClusterMap, Holding};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(map) = ClusterMap::parse(text) else {
        return;
    };
    let again = ClusterMap::parse(&map.text()).expect("a map's own text parses");
    assert_eq!(again.text(), map.text());
    for pair in 0..map.pairs().min(4) {
        let holding = Holding::of(&map, pair);
        let _ = holding.admits(data, true);
        let _ = holding.admits(b"", false);
    }
});
