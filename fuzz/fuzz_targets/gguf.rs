#![no_main]
// Thin wrapper: the harness is bitlora_core::fuzzing::gguf, replayed on stable by
// crates/core/tests/fuzz_corpus.rs.
libfuzzer_sys::fuzz_target!(|data: &[u8]| bitlora_core::fuzzing::gguf(data));
