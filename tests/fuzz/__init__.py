"""Fuzz harnesses: one module per target, each a `check(data: bytes)` that raises
AssertionError when a property breaks (not only when the target crashes).

- `fuzz_request`: the request framer against a slow reference parser and hiredis;
- `fuzz_reply`: the reply framer against a reference parser and hiredis;
- `fuzz_acl`: role ACL rules (parse_role / compile_roles);
- `fuzz_glob`: the compiled key/channel pattern matchers against Redis's stringmatchlen port;
- `fuzz_config`: `load_config` on mutated TOML.

`python -m tests.fuzz.fuzz_request [libFuzzer flags]` runs one under atheris (coverage
guided; bench/fuzz.py drives the long runs); tests/fuzz/test_fuzz_short.py replays the
seed corpus and a fixed number of seeded mutations inside pytest.
"""
