#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| hubgate::fuzzing::batch_split(data));
