//! The shape of the source tree: the library's top-level modules depend on each other without
//! cycles, and `gate/` (the pure Meta rules) reaches nothing but `secret`. Read from the source
//! files, so a new `use crate::…` that breaks the layering fails here.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Binary-only files: they use the library from outside.
const BINARY: &[&str] = &["main.rs", "demo.rs", "spool_cli.rs", "lib.rs"];

/// Top-level module -> the top-level modules its code names through `crate::`.
fn module_graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut graph = BTreeMap::new();
    let mut files = vec![src.clone()];
    while let Some(path) = files.pop() {
        if path.is_dir() {
            for entry in std::fs::read_dir(&path).expect("readable src dir") {
                files.push(entry.expect("dir entry").path());
            }
            continue;
        }
        let rel = path.strip_prefix(&src).expect("under src");
        let rel_text = rel.to_string_lossy();
        if path.extension().is_none_or(|e| e != "rs") || BINARY.contains(&rel_text.as_ref()) {
            continue;
        }
        let first = rel.components().next().expect("a component");
        let top = first
            .as_os_str()
            .to_string_lossy()
            .trim_end_matches(".rs")
            .to_owned();
        let text = std::fs::read_to_string(&path).expect("readable source");
        let deps: &mut BTreeSet<String> = graph.entry(top.clone()).or_default();
        for line in text.lines().filter(|l| !l.trim_start().starts_with("//")) {
            for (i, _) in line.match_indices("crate::") {
                let rest = &line[i + "crate::".len()..];
                let names: Vec<&str> = match rest.strip_prefix('{') {
                    // `crate::{a, b::c}`: every first segment in the group.
                    Some(group) => group
                        .split('}')
                        .next()
                        .unwrap_or("")
                        .split(',')
                        .map(|p| p.trim().split("::").next().unwrap_or(""))
                        .collect(),
                    None => vec![rest
                        .split(|c: char| !c.is_alphanumeric() && c != '_')
                        .next()
                        .unwrap_or("")],
                };
                for name in names {
                    // Lower-case names are modules; `crate::Error` and friends are the root's.
                    if !name.is_empty()
                        && name != top
                        && name.starts_with(|c: char| c.is_ascii_lowercase())
                    {
                        deps.insert(name.to_owned());
                    }
                }
            }
        }
    }
    graph
}

#[test]
fn top_level_modules_have_no_import_cycles() {
    let graph = module_graph();
    assert!(graph.contains_key("pipeline") && graph.contains_key("identity"));
    // Depth-first search; a module met again while still on the path closes a cycle.
    fn visit<'g>(
        m: &'g str,
        graph: &'g BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<&'g str>,
        done: &mut BTreeSet<&'g str>,
    ) {
        if let Some(at) = path.iter().position(|p| *p == m) {
            panic!(
                "import cycle: {}",
                [&path[at..], &[m]].concat().join(" -> ")
            );
        }
        if !done.insert(m) {
            return;
        }
        path.push(m);
        for dep in graph.get(m).into_iter().flatten() {
            visit(dep, graph, path, done);
        }
        path.pop();
    }
    let mut done = BTreeSet::new();
    for m in graph.keys() {
        visit(m, &graph, &mut Vec::new(), &mut done);
    }
}

#[test]
fn gate_reaches_nothing_but_secret() {
    let graph = module_graph();
    let gate: Vec<&String> = graph["gate"].iter().collect();
    assert_eq!(gate, ["secret"], "gate/ must stay pure Meta rules");
}
