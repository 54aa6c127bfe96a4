//! The layout rules of the source tree (issue 21), checked so they stay true: no function over
//! 120 lines outside the SIMD kernels, at most 10 files at the top of `compiler/src` (the rest in
//! one folder per pipeline stage), and no import cycle between the top-level modules of either
//! library crate.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

const MAX_FUNCTION_LINES: usize = 120;
const MAX_TOP_LEVEL_FILES: usize = 10;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The line with string and char literals emptied and the `//` comment cut, so braces count.
fn code_of(line: &str) -> String {
    let mut out = String::new();
    let mut chars = line.chars().peekable();
    let mut in_string = false;
    while let Some(c) = chars.next() {
        match (in_string, c) {
            (true, '\\') => {
                chars.next();
            }
            (true, '"') => in_string = false,
            (true, _) => {}
            (false, '"') => in_string = true,
            (false, '\'') => {
                // A char literal ('x', '\n', '{'), not a lifetime ('a).
                let rest: String = chars.clone().take(3).collect();
                if rest.starts_with('\\') || rest.chars().nth(1) == Some('\'') {
                    while let Some(d) = chars.next() {
                        if d == '\\' {
                            chars.next();
                        } else if d == '\'' {
                            break;
                        }
                    }
                }
            }
            (false, '/') if chars.peek() == Some(&'/') => break,
            (false, c) => out.push(c),
        }
    }
    out
}

/// `(name, lines)` of every function with a body in `source`, and whether it is a SIMD kernel
/// (`#[target_feature]` on it).
fn functions(source: &str) -> Vec<(String, usize, bool)> {
    let lines: Vec<&str> = source.lines().collect();
    let mut found = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let code = code_of(line);
        let Some(at) = code.find("fn ") else { continue };
        let before = code[..at].trim();
        let words_ok = before.split_whitespace().all(|w| {
            ["pub", "unsafe", "const", "async", "extern"].contains(&w) || w.starts_with("pub(")
        });
        if !words_ok {
            continue;
        }
        let name: String = code[at + 3..]
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        let (mut depth, mut started, mut end) = (0i32, false, None);
        for (j, l) in lines.iter().enumerate().skip(i) {
            let c = code_of(l);
            if !started && c.contains(';') && !c.contains('{') {
                break; // a declaration without a body
            }
            for ch in c.chars() {
                match ch {
                    '{' => {
                        depth += 1;
                        started = true;
                    }
                    '}' => depth -= 1,
                    _ => {}
                }
            }
            if started && depth == 0 {
                end = Some(j);
                break;
            }
        }
        if let Some(end) = end {
            let simd = lines[i.saturating_sub(4)..i]
                .iter()
                .any(|l| l.contains("#[target_feature"));
            found.push((name, end - i + 1, simd));
        }
    }
    found
}

#[test]
fn no_function_is_longer_than_120_lines_outside_the_simd_kernels() {
    let mut files = Vec::new();
    for krate in ["compiler/src", "runtime/src"] {
        rust_files(&root().join(krate), &mut files);
    }
    let mut long = Vec::new();
    for file in &files {
        for (name, lines, simd) in functions(&fs::read_to_string(file).unwrap()) {
            if lines > MAX_FUNCTION_LINES && !simd {
                long.push(format!("{} {name}: {lines} lines", file.display()));
            }
        }
    }
    assert!(
        long.is_empty(),
        "functions over {MAX_FUNCTION_LINES} lines:\n{}",
        long.join("\n")
    );
}

#[test]
fn the_function_counter_sees_bodies_strings_and_kernels() {
    let source = "pub fn a() {\n    let s = \"}{\";\n    let c = '{';\n}\n\n#[target_feature(enable = \"avx2\")]\nunsafe fn k<'a>(x: &'a u8) {\n    {\n    }\n}\nfn decl();\n";
    assert_eq!(
        functions(source),
        vec![("a".to_string(), 4, false), ("k".to_string(), 4, true)]
    );
}

#[test]
fn compiler_src_keeps_at_most_10_files_at_its_top_level() {
    let files: Vec<String> = fs::read_dir(root().join("compiler/src"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert!(files.len() <= MAX_TOP_LEVEL_FILES, "{files:?}");
}

/// `crate::X` references between the top-level modules of the library under `src`, test code
/// (`#[cfg(test)]` and after) left out.
fn module_graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in files {
        let rel = file.strip_prefix(src).unwrap();
        let top = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy();
        let module = top.trim_end_matches(".rs").to_string();
        if ["lib", "main", "bin"].contains(&module.as_str()) {
            continue;
        }
        let source = fs::read_to_string(&file).unwrap();
        let code = source.split("#[cfg(test)]").next().unwrap();
        for (at, _) in code.match_indices("crate::") {
            if code[..at].ends_with("graft_") || code[..at].ends_with('_') {
                continue;
            }
            let target: String = code[at + 7..]
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if !target.is_empty() && target != module {
                graph.entry(module.clone()).or_default().insert(target);
            }
        }
    }
    graph
}

/// A cycle through `start`, if any, as the list of modules on it.
fn cycle_from(graph: &BTreeMap<String, BTreeSet<String>>, start: &str) -> Option<Vec<String>> {
    fn walk(
        graph: &BTreeMap<String, BTreeSet<String>>,
        node: &str,
        start: &str,
        path: &mut Vec<String>,
        seen: &mut BTreeSet<String>,
    ) -> bool {
        for next in graph.get(node).into_iter().flatten() {
            if next == start {
                return true;
            }
            if seen.insert(next.clone()) {
                path.push(next.clone());
                if walk(graph, next, start, path, seen) {
                    return true;
                }
                path.pop();
            }
        }
        false
    }
    let mut path = vec![start.to_string()];
    walk(graph, start, start, &mut path, &mut BTreeSet::new()).then_some(path)
}

#[test]
fn no_import_cycle_between_top_level_modules() {
    for krate in ["compiler/src", "runtime/src"] {
        let graph = module_graph(&root().join(krate));
        assert!(graph.len() > 3, "{krate}: {graph:?}");
        for module in graph.keys() {
            if let Some(cycle) = cycle_from(&graph, module) {
                panic!("{krate}: import cycle {}", cycle.join(" -> "));
            }
        }
    }
}

#[test]
fn the_cycle_finder_finds_a_cycle() {
    let graph: BTreeMap<String, BTreeSet<String>> = [
        ("a", vec!["b"]),
        ("b", vec!["c"]),
        ("c", vec!["a"]),
        ("d", vec!["a"]),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.into_iter().map(String::from).collect()))
    .collect();
    assert_eq!(cycle_from(&graph, "a").unwrap(), ["a", "b", "c"]);
    assert!(cycle_from(&graph, "d").is_none());
}
