//! `cargo xtask ci`'s layering check: inside every crate of the workspace, at every level of the
//! module tree, the sibling modules must form a graph without a cycle — so that the tree reads as
//! the architecture diagram and data flows one way.
//!
//! The module tree is found from each crate root (`lib.rs`, `main.rs`, `src/bin/*.rs`, benches
//! and integration tests are roots of their own) by following `mod name;` declarations. A file's
//! references are the `crate::…`, `super::…` and `self::…` paths it names anywhere (in `use`
//! trees and in expressions), resolved to the deepest module they reach. A reference from module
//! `a::b::x` to `a::c::y` is an edge `b → c` among the children of `a`; references between a
//! module and its own ancestors or descendants are not edges (a parent re-exporting its child's
//! items, a child using its parent's types). Items under `#[cfg(test)]` are left out: tests may
//! reach anywhere.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use syn::visit::Visit;

/// A module path from the crate root, e.g. `["runtime", "worker", "pool"]`.
type ModPath = Vec<String>;

/// One reference: from which module, to which module, and where (for the report).
#[derive(Debug, Clone)]
struct Reference {
    from: ModPath,
    to: ModPath,
    at: String,
}

/// Checks every crate root under `crates` (directories holding a `Cargo.toml` with `src/`).
pub fn check(crate_dirs: &[PathBuf]) -> anyhow::Result<()> {
    let mut problems = Vec::new();
    let mut roots = 0;
    for dir in crate_dirs {
        for root in crate_roots(dir) {
            roots += 1;
            let (modules, refs) = load_crate(&root)?;
            problems.extend(cycles(&modules, &refs).into_iter().map(|c| {
                format!(
                    "{}: {c}",
                    root.strip_prefix(crate::root()).unwrap_or(&root).display()
                )
            }));
        }
    }
    if !problems.is_empty() {
        bail!(
            "module cycles (siblings that depend on each other):\n{}",
            problems.join("\n")
        );
    }
    println!("no module cycle in {roots} crate roots");
    Ok(())
}

/// `src/lib.rs`, `src/main.rs`, `src/bin/*.rs`, `benches/*.rs`, `tests/*.rs` (and the
/// privileged and fuzz targets) of a crate directory.
fn crate_roots(dir: &Path) -> Vec<PathBuf> {
    let mut roots: Vec<PathBuf> = ["src/lib.rs", "src/main.rs"]
        .iter()
        .map(|p| dir.join(p))
        .filter(|p| p.is_file())
        .collect();
    for sub in ["src/bin", "benches", "tests", "privileged", "fuzz_targets"] {
        if let Ok(entries) = std::fs::read_dir(dir.join(sub)) {
            let mut files: Vec<PathBuf> = entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "rs"))
                .collect();
            files.sort();
            roots.extend(files);
        }
    }
    roots
}

/// Every module of the crate rooted at `root`, and every reference between them.
fn load_crate(root: &Path) -> anyhow::Result<(BTreeSet<ModPath>, Vec<Reference>)> {
    let mut modules = BTreeSet::new();
    let mut refs = Vec::new();
    // (file, its module path, the directory its child module files live in)
    let dir = root.parent().expect("a file has a parent").to_path_buf();
    let mut todo = vec![(root.to_path_buf(), Vec::new(), dir)];
    while let Some((file, path, child_dir)) = todo.pop() {
        let text = std::fs::read_to_string(&file)
            .with_context(|| format!("reading {}", file.display()))?;
        let ast = syn::parse_file(&text).with_context(|| format!("parsing {}", file.display()))?;
        modules.insert(path.clone());
        let mut v = Visitor {
            file: &file,
            stack: path.clone(),
            child_dir: child_dir.clone(),
            found_files: Vec::new(),
            modules: &mut modules,
            refs: &mut refs,
        };
        v.visit_file(&ast);
        todo.extend(v.found_files);
    }
    Ok((modules, refs))
}

struct Visitor<'a> {
    file: &'a Path,
    /// The module being visited (inline modules push onto it).
    stack: ModPath,
    /// Where `mod x;` of the current module finds `x.rs` or `x/mod.rs`.
    child_dir: PathBuf,
    found_files: Vec<(PathBuf, ModPath, PathBuf)>,
    modules: &'a mut BTreeSet<ModPath>,
    refs: &'a mut Vec<Reference>,
}

fn is_cfg_test(attrs: &[syn::Attribute]) -> bool {
    attrs.iter().any(|a| {
        a.path().is_ident("cfg")
            && a.parse_args::<syn::Meta>()
                .is_ok_and(|m| m.path().is_ident("test"))
    })
}

impl Visitor<'_> {
    /// Resolves `segments` (starting with `crate`, `super` or `self`) to an absolute path.
    fn absolute(&self, segments: &[String]) -> Option<ModPath> {
        let mut base = self.stack.clone();
        let mut rest = segments;
        match rest.first()?.as_str() {
            "crate" => {
                base.clear();
                rest = &rest[1..];
            }
            "self" => rest = &rest[1..],
            "super" => {
                while rest.first().is_some_and(|s| s == "super") {
                    base.pop()?;
                    rest = &rest[1..];
                }
            }
            _ => return None,
        }
        base.extend(rest.iter().cloned());
        Some(base)
    }

    fn record(&mut self, segments: &[String], line: usize) {
        if let Some(to) = self.absolute(segments) {
            self.refs.push(Reference {
                from: self.stack.clone(),
                to,
                at: format!(
                    "{}:{line}",
                    self.file
                        .strip_prefix(crate::root())
                        .unwrap_or(self.file)
                        .display()
                ),
            });
        }
    }

    fn use_tree(&mut self, prefix: &mut Vec<String>, tree: &syn::UseTree, line: usize) {
        match tree {
            syn::UseTree::Path(p) => {
                prefix.push(p.ident.to_string());
                self.use_tree(prefix, &p.tree, line);
                prefix.pop();
            }
            syn::UseTree::Name(n) => {
                prefix.push(n.ident.to_string());
                self.record(prefix, line);
                prefix.pop();
            }
            syn::UseTree::Rename(r) => {
                prefix.push(r.ident.to_string());
                self.record(prefix, line);
                prefix.pop();
            }
            syn::UseTree::Glob(_) => self.record(prefix, line),
            syn::UseTree::Group(g) => {
                for t in &g.items {
                    self.use_tree(prefix, t, line);
                }
            }
        }
    }

    fn line_of(&self, ident: &proc_macro2::Ident) -> usize {
        ident.span().start().line
    }
}

impl<'ast> Visit<'ast> for Visitor<'_> {
    fn visit_item_mod(&mut self, m: &'ast syn::ItemMod) {
        if is_cfg_test(&m.attrs) {
            return;
        }
        let name = m.ident.to_string();
        let mut path = self.stack.clone();
        path.push(name.clone());
        match &m.content {
            Some((_, items)) => {
                self.modules.insert(path.clone());
                let inner = self.child_dir.join(&name);
                let saved = std::mem::replace(&mut self.child_dir, inner);
                self.stack.push(name);
                for item in items {
                    self.visit_item(item);
                }
                self.stack.pop();
                self.child_dir = saved;
            }
            None => {
                let explicit = m.attrs.iter().find_map(|a| {
                    if !a.path().is_ident("path") {
                        return None;
                    }
                    let syn::Meta::NameValue(nv) = &a.meta else {
                        return None;
                    };
                    let syn::Expr::Lit(syn::ExprLit {
                        lit: syn::Lit::Str(s),
                        ..
                    }) = &nv.value
                    else {
                        return None;
                    };
                    Some(self.file.parent()?.join(s.value()))
                });
                let (file, dir) = match explicit {
                    Some(f) => {
                        let dir = f.parent().map(Path::to_path_buf).unwrap_or_default();
                        (f, dir)
                    }
                    None => {
                        let flat = self.child_dir.join(format!("{name}.rs"));
                        if flat.is_file() {
                            (flat, self.child_dir.join(&name))
                        } else {
                            let d = self.child_dir.join(&name);
                            (d.join("mod.rs"), d)
                        }
                    }
                };
                // A module from outside the crate's folder (shared test helpers) is its own
                // island: it is still a module of this crate, so it is followed.
                self.found_files.push((file, path, dir));
            }
        }
    }

    fn visit_item_fn(&mut self, f: &'ast syn::ItemFn) {
        if !is_cfg_test(&f.attrs) {
            syn::visit::visit_item_fn(self, f);
        }
    }

    fn visit_item_impl(&mut self, i: &'ast syn::ItemImpl) {
        if !is_cfg_test(&i.attrs) {
            syn::visit::visit_item_impl(self, i);
        }
    }

    fn visit_item_use(&mut self, u: &'ast syn::ItemUse) {
        if is_cfg_test(&u.attrs) {
            return;
        }
        let line = match &u.tree {
            syn::UseTree::Path(p) => self.line_of(&p.ident),
            syn::UseTree::Name(n) => self.line_of(&n.ident),
            _ => 0,
        };
        self.use_tree(&mut Vec::new(), &u.tree, line);
    }

    fn visit_path(&mut self, p: &'ast syn::Path) {
        if let Some(first) = p.segments.first() {
            let segments: Vec<String> = p.segments.iter().map(|s| s.ident.to_string()).collect();
            let line = self.line_of(&first.ident);
            self.record(&segments, line);
        }
        syn::visit::visit_path(self, p);
    }

    fn visit_macro(&mut self, m: &'ast syn::Macro) {
        // Paths inside macro calls (`format!`, `matches!`, tracing) are tokens, not syntax:
        // look for `crate :: a :: b` and `super :: …` sequences in them.
        let tokens: Vec<proc_macro2::TokenTree> = flatten(m.tokens.clone());
        let mut i = 0;
        while i < tokens.len() {
            if let proc_macro2::TokenTree::Ident(id) = &tokens[i]
                && (id == "crate" || id == "super")
            {
                let mut segments = vec![id.to_string()];
                let mut j = i + 1;
                while let (
                    Some(proc_macro2::TokenTree::Punct(a)),
                    Some(proc_macro2::TokenTree::Punct(b)),
                    Some(proc_macro2::TokenTree::Ident(next)),
                ) = (tokens.get(j), tokens.get(j + 1), tokens.get(j + 2))
                    && a.as_char() == ':'
                    && b.as_char() == ':'
                {
                    segments.push(next.to_string());
                    j += 3;
                }
                let line = id.span().start().line;
                self.record(&segments, line);
                i = j;
            } else {
                i += 1;
            }
        }
        syn::visit::visit_macro(self, m);
    }
}

fn flatten(ts: proc_macro2::TokenStream) -> Vec<proc_macro2::TokenTree> {
    let mut out = Vec::new();
    for t in ts {
        match t {
            proc_macro2::TokenTree::Group(g) => out.extend(flatten(g.stream())),
            other => out.push(other),
        }
    }
    out
}

/// The deepest known module that `path` names (a path may go on into an item).
fn module_of(modules: &BTreeSet<ModPath>, path: &[String]) -> ModPath {
    (0..=path.len())
        .rev()
        .map(|n| path[..n].to_vec())
        .find(|p| modules.contains(p))
        .unwrap_or_default()
}

/// Every cycle among siblings, one line each: `in runtime: a -> b -> a (a -> b at file:line; …)`.
fn cycles(modules: &BTreeSet<ModPath>, refs: &[Reference]) -> Vec<String> {
    // parent -> (child -> (child -> example reference))
    let mut graphs: BTreeMap<ModPath, BTreeMap<String, BTreeMap<String, String>>> = BTreeMap::new();
    for r in refs {
        let from = module_of(modules, &r.from);
        let to = module_of(modules, &r.to);
        let common = from.iter().zip(&to).take_while(|(a, b)| a == b).count();
        if common == from.len() || common == to.len() {
            continue; // the same module, or an ancestor and its descendant
        }
        graphs
            .entry(from[..common].to_vec())
            .or_default()
            .entry(from[common].clone())
            .or_default()
            .entry(to[common].clone())
            .or_insert_with(|| r.at.clone());
    }
    let mut found = Vec::new();
    for (parent, graph) in &graphs {
        for cycle in strongly_connected(graph) {
            let scope = if parent.is_empty() {
                "the crate root".to_string()
            } else {
                parent.join("::")
            };
            let edges: Vec<String> = cycle
                .iter()
                .flat_map(|a| {
                    graph[a]
                        .iter()
                        .filter(|(b, _)| cycle.contains(*b))
                        .map(move |(b, at)| format!("{a} -> {b} at {at}"))
                })
                .collect();
            found.push(format!(
                "in {scope}: {{{}}} depend on each other ({})",
                cycle.iter().cloned().collect::<Vec<_>>().join(", "),
                edges.join("; ")
            ));
        }
    }
    found
}

/// Components with more than one node (Tarjan's algorithm, iterative enough for module graphs).
fn strongly_connected(graph: &BTreeMap<String, BTreeMap<String, String>>) -> Vec<BTreeSet<String>> {
    struct State<'g> {
        graph: &'g BTreeMap<String, BTreeMap<String, String>>,
        index: BTreeMap<&'g str, usize>,
        low: BTreeMap<&'g str, usize>,
        stack: Vec<&'g str>,
        on_stack: BTreeSet<&'g str>,
        next: usize,
        out: Vec<BTreeSet<String>>,
    }
    fn visit<'g>(s: &mut State<'g>, v: &'g str) {
        s.index.insert(v, s.next);
        s.low.insert(v, s.next);
        s.next += 1;
        s.stack.push(v);
        s.on_stack.insert(v);
        if let Some(edges) = s.graph.get(v) {
            for w in edges.keys() {
                let w = w.as_str();
                if !s.index.contains_key(w) {
                    visit(s, w);
                    let lw = s.low[w];
                    let lv = s.low.get_mut(v).expect("visited");
                    *lv = (*lv).min(lw);
                } else if s.on_stack.contains(w) {
                    let iw = s.index[w];
                    let lv = s.low.get_mut(v).expect("visited");
                    *lv = (*lv).min(iw);
                }
            }
        }
        if s.low[v] == s.index[v] {
            let mut comp = BTreeSet::new();
            while let Some(w) = s.stack.pop() {
                s.on_stack.remove(w);
                comp.insert(w.to_string());
                if w == v {
                    break;
                }
            }
            if comp.len() > 1 {
                s.out.push(comp);
            }
        }
    }
    let mut s = State {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        next: 0,
        out: Vec::new(),
    };
    for v in graph.keys() {
        if !s.index.contains_key(v.as_str()) {
            visit(&mut s, v);
        }
    }
    s.out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, rel: &str, text: &str) {
        let p = dir.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }

    fn problems(dir: &Path) -> Vec<String> {
        let (m, r) = load_crate(&dir.join("src/lib.rs")).unwrap();
        cycles(&m, &r)
    }

    #[test]
    fn a_cycle_between_siblings_is_found_with_where_it_is() {
        let dir = tempdir();
        write(&dir, "src/lib.rs", "pub mod a;\npub mod b;\n");
        write(&dir, "src/a.rs", "use crate::b::B;\npub struct A;\n");
        write(&dir, "src/b/mod.rs", "pub mod inner;\npub struct B;\n");
        write(
            &dir,
            "src/b/inner.rs",
            "pub fn f() -> crate::a::A { crate::a::A }\n",
        );
        let p = problems(&dir);
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].contains("{a, b}"), "{p:?}");
        assert!(
            p[0].contains("b -> a at") && p[0].contains("inner.rs:1"),
            "{p:?}"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn parents_and_children_and_tests_are_not_cycles() {
        let dir = tempdir();
        write(
            &dir,
            "src/lib.rs",
            "pub mod a;\npub mod b;\npub struct Root;\n",
        );
        // a uses b and its parent; b's child uses b (its parent) and a only in a test.
        write(
            &dir,
            "src/a/mod.rs",
            "pub mod x;\npub use x::X;\nuse crate::b::B;\nuse super::Root;\n",
        );
        write(
            &dir,
            "src/a/x.rs",
            "pub struct X(pub super::super::Root);\n",
        );
        write(
            &dir,
            "src/b/mod.rs",
            "mod y;\npub struct B;\n#[cfg(test)]\nmod tests { use crate::a::X; }\n",
        );
        write(
            &dir,
            "src/b/y.rs",
            "use super::B;\n#[cfg(test)]\nfn t() { let _ = crate::a::X; }\n",
        );
        assert_eq!(problems(&dir), Vec::<String>::new());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn paths_in_macros_and_groups_count() {
        let dir = tempdir();
        write(&dir, "src/lib.rs", "pub mod a;\npub mod b;\n");
        write(&dir, "src/a.rs", "use crate::{b::{self}};\npub fn f() {}\n");
        write(
            &dir,
            "src/b.rs",
            "pub fn g() { let _ = format!(\"{:?}\", crate::a::f()); }\n",
        );
        let p = problems(&dir);
        assert_eq!(p.len(), 1, "{p:?}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    fn tempdir() -> PathBuf {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static N: AtomicUsize = AtomicUsize::new(0);
        let d = std::env::temp_dir().join(format!(
            "xtask-layers-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}
