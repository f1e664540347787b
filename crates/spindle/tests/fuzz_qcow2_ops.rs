//! The `qcow2_ops` fuzz harness in the suite: its committed seed corpus
//! (fuzz/corpus/qcow2_ops) and 150 deterministic scripts, each
//! checked against the harness's model of the guest-visible contents.

mod common;
use common::*;
use rand::{Rng, SeedableRng};

#[test]
fn qcow2_ops_corpus_and_random_scripts() {
    let work = scratch();
    let corpus = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/qcow2_ops");
    let mut n = 0;
    for e in std::fs::read_dir(&corpus).expect("fuzz/corpus/qcow2_ops") {
        let path = e.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        let t = std::time::Instant::now();
        let r = std::panic::catch_unwind(|| spindle_block::fuzzing::qcow2_ops(&data, work.path()));
        assert!(r.is_ok(), "{} failed", path.display());
        assert!(t.elapsed().as_secs() < 10, "{} took {:?}", path.display(), t.elapsed());
        n += 1;
    }
    assert!(n >= 8, "only {n} seed inputs in {}", corpus.display());
    let mut rng = rand::rngs::StdRng::seed_from_u64(10);
    for i in 0..150 {
        // Images the harness creates, so the model holds.
        let mut data: Vec<u8> = (0..rng.gen_range(3..3 + 5 * 40)).map(|_| rng.gen()).collect();
        data[0] &= 0x7f;
        let t = std::time::Instant::now();
        let r = std::panic::catch_unwind(|| spindle_block::fuzzing::qcow2_ops(&data, work.path()));
        assert!(r.is_ok(), "script {i} failed; input: {data:02x?}");
        assert!(
            t.elapsed().as_secs() < 10,
            "script {i} took {:?}: {data:?}",
            t.elapsed()
        );
    }
    eprintln!("qcow2_ops: {n} corpus inputs and 150 scripts");
}
