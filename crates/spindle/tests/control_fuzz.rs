//! The control protocol's fuzz harness (`spindle::fuzzing::control_bytes`,
//! the `control_request` cargo-fuzz target) over its seed corpus and a few
//! hundred deterministic mutations of it, so a regression shows up without
//! the fuzzer (docs/fuzzing.md).

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use spindle::fuzzing::control_bytes;
use std::path::PathBuf;

fn seeds() -> Vec<(String, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/control_request");
    let mut seeds: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| {
            let path = e.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&path).unwrap())
        })
        .collect();
    seeds.sort();
    assert!(seeds.len() >= 5, "the seed corpus is missing");
    seeds
}

const TOKENS: &[&[u8]] = &[
    b"\n",
    b"\r\n",
    b"\xff",
    b"\xc3",
    b"\"",
    b"{",
    b"}",
    b"[",
    b"]",
    b",",
    b":",
    b"null",
    b"1e999",
    b"-1",
    b"18446744073709551616",
    b"\"cmd\":\"list\"",
    b"\"shrink\":true",
    b"\\u0000",
    b" ",
];

fn mutate(rng: &mut SmallRng, seeds: &[(String, Vec<u8>)], data: &mut Vec<u8>) {
    for _ in 0..rng.gen_range(1..4) {
        let at = rng.gen_range(0..=data.len());
        match rng.gen_range(0..6) {
            0 if !data.is_empty() => {
                let i = rng.gen_range(0..data.len());
                data[i] ^= 1 << rng.gen_range(0..8);
            }
            1 => {
                let t = TOKENS[rng.gen_range(0..TOKENS.len())];
                data.splice(at..at, t.iter().copied());
            }
            2 if at < data.len() => {
                let end = rng.gen_range(at..=data.len().min(at + 16));
                data.drain(at..end);
            }
            3 => {
                // Splice in a line of another seed.
                let other = &seeds[rng.gen_range(0..seeds.len())].1;
                let lines: Vec<&[u8]> = other.split(|&b| b == b'\n').collect();
                let line = lines[rng.gen_range(0..lines.len())];
                let mut l = line.to_vec();
                l.push(b'\n');
                let at = data[..at].iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
                data.splice(at..at, l);
            }
            4 if !data.is_empty() => {
                let i = rng.gen_range(0..data.len());
                data[i] = rng.gen();
            }
            _ => data.truncate(at),
        }
    }
}

#[test]
fn control_harness_holds_on_the_seeds_and_their_mutations() {
    let dir = tempfile::tempdir().unwrap();
    let seeds = seeds();
    for (name, data) in &seeds {
        eprintln!("seed {name}");
        control_bytes(data, dir.path());
    }
    let mut rng = SmallRng::seed_from_u64(10);
    for i in 0..400 {
        let mut data = seeds[i % seeds.len()].1.clone();
        mutate(&mut rng, &seeds, &mut data);
        control_bytes(&data, dir.path());
    }
}

#[test]
fn control_harness_holds_for_lines_over_the_cap() {
    let dir = tempfile::tempdir().unwrap();
    let mut data = vec![b'x'; 64 * 1024 + 1];
    data.extend_from_slice(b"\n{\"cmd\":\"list\"}\n");
    data.extend(vec![b'{'; 200 * 1024]);
    data.extend_from_slice(b"\n\n");
    data.extend(vec![b'y'; 64 * 1024]);
    control_bytes(&data, dir.path());
}
