//! The registry documentation (`docs/`) must agree with the schemas: every attribute and
//! block of a resource, data source or the provider configuration is listed on its page, in
//! the right section (required, optional, read-only), and the page lists nothing else.
//!
//! `EDGIBLE_WRITE_DOCS=1 cargo test -p terraform-provider-edgible --test docs` rewrites the
//! `## Schema` section of every page from the schemas (keeping the rest of the page) and
//! creates missing pages with a skeleton to fill in.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use terraform_provider_edgible::EdgibleProvider;
use terraform_provider_edgible::schema::{Attribute, Block, Nesting, Presence, Schema};
use terraform_provider_edgible::value::Type;

const WRITE_ENV: &str = "EDGIBLE_WRITE_DOCS";

/// One listed attribute or block: where (the dotted path of its block), its name and its
/// section.
type Entry = (String, String, &'static str);

fn docs_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("docs")
}

struct Page {
    path: PathBuf,
    /// `edgible_application`, or `edgible` for the provider.
    name: String,
    kind: &'static str,
    schema: &'static Schema,
}

fn pages() -> Vec<Page> {
    // The provider is only used for its schemas; leaking it gives them a 'static lifetime.
    let provider: &'static EdgibleProvider = Box::leak(Box::new(EdgibleProvider::new(Arc::new(|_: &str| None))));
    let mut pages = vec![Page {
        path: docs_dir().join("index.md"),
        name: "edgible".to_owned(),
        kind: "Provider",
        schema: terraform_provider_edgible::config::schema(),
    }];
    for resource in provider.resources() {
        let name = resource.type_name();
        pages.push(Page {
            path: docs_dir().join("resources").join(format!("{}.md", short(name))),
            name: name.to_owned(),
            kind: "Resource",
            schema: resource.schema(),
        });
    }
    for source in provider.data_sources() {
        let name = source.type_name();
        pages.push(Page {
            path: docs_dir().join("data-sources").join(format!("{}.md", short(name))),
            name: name.to_owned(),
            kind: "Data Source",
            schema: source.schema(),
        });
    }
    pages
}

/// `edgible_device_pool` → `device_pool`, the registry's file name.
fn short(name: &str) -> &str {
    name.strip_prefix("edgible_").unwrap_or(name)
}

fn section(attribute: &Attribute) -> &'static str {
    match attribute.presence {
        Presence::Required => "Required",
        Presence::Optional | Presence::OptionalComputed => "Optional",
        Presence::Computed => "Read-Only",
    }
}

fn block_section(min_items: i64) -> &'static str {
    if min_items > 0 { "Required" } else { "Optional" }
}

fn type_name(ty: &Type) -> String {
    match ty {
        Type::String => "String".into(),
        Type::Number => "Number".into(),
        Type::Bool => "Boolean".into(),
        Type::List(element) => format!("List of {}", type_name(element)),
        Type::Set(element) => format!("Set of {}", type_name(element)),
        Type::Map(element) => format!("Map of {}", type_name(element)),
        Type::Object(_) => "Object".into(),
    }
}

/// Everything the schema says a page must list.
fn expected_entries(block: &Block, path: &str, entries: &mut BTreeSet<Entry>) {
    for attribute in &block.attributes {
        entries.insert((path.to_owned(), attribute.name.to_owned(), section(attribute)));
    }
    for nested in &block.blocks {
        entries.insert((path.to_owned(), nested.name.to_owned(), block_section(nested.min_items)));
        let inner = if path.is_empty() { nested.name.to_owned() } else { format!("{path}.{}", nested.name) };
        expected_entries(&nested.block, &inner, entries);
    }
}

/// Everything a page lists: `- \`name\` (...)` lines under `## Schema`, by block path and
/// section.
fn listed_entries(markdown: &str) -> BTreeSet<Entry> {
    let mut entries = BTreeSet::new();
    let mut in_schema = false;
    let mut path = String::new();
    let mut current: Option<&'static str> = None;
    for line in markdown.lines() {
        let trimmed = line.trim();
        if let Some(heading) = trimmed.strip_prefix("## ") {
            in_schema = heading.trim() == "Schema";
            path.clear();
            current = None;
            continue;
        }
        if !in_schema {
            continue;
        }
        if let Some(rest) = trimmed.strip_prefix("### Nested Schema for `") {
            path = rest.trim_end_matches('`').to_owned();
            current = None;
            continue;
        }
        for name in ["Required", "Optional", "Read-Only"] {
            if trimmed == format!("### {name}") || trimmed == format!("{name}:") {
                current = Some(match name {
                    "Required" => "Required",
                    "Optional" => "Optional",
                    _ => "Read-Only",
                });
            }
        }
        if let Some(rest) = trimmed.strip_prefix("- `")
            && let Some((name, _)) = rest.split_once('`')
        {
            entries.insert((path.clone(), name.to_owned(), current.unwrap_or("(no section)")));
        }
    }
    entries
}

/// The `## Schema` section for a block, in the registry's layout.
fn render_schema(block: &Block) -> String {
    let mut out = String::from("## Schema\n");
    render_block(block, "", &mut out);
    out
}

fn render_block(block: &Block, path: &str, out: &mut String) {
    let top = path.is_empty();
    if !top {
        let anchor = path.replace('.', "--");
        let _ = write!(out, "\n<a id=\"nestedblock--{anchor}\"></a>\n### Nested Schema for `{path}`\n");
        if !block.description.is_empty() {
            let _ = write!(out, "\n{}\n", block.description);
        }
    }
    for (section_name, heading) in [("Required", "Required"), ("Optional", "Optional"), ("Read-Only", "Read-Only")] {
        let mut lines = Vec::new();
        for attribute in block.attributes.iter().filter(|attribute| section(attribute) == section_name) {
            let mut notes = Vec::new();
            if attribute.sensitive {
                notes.push("Sensitive".to_owned());
            }
            if let Some(default) = &attribute.default {
                notes.push(format!("Defaults to `{}`", default.to_json()));
            }
            if attribute.requires_replace {
                notes.push("Changing it replaces the object".to_owned());
            }
            let extra = if notes.is_empty() { String::new() } else { format!(" ({})", notes.join(". ")) };
            lines.push((
                attribute.name,
                format!("- `{}` ({}) {}{extra}", attribute.name, type_name(&attribute.ty), attribute.description),
            ));
        }
        for nested in block.blocks.iter().filter(|nested| block_section(nested.min_items) == section_name) {
            let inner = if top { nested.name.to_owned() } else { format!("{path}.{}", nested.name) };
            let anchor = inner.replace('.', "--");
            let kind = match nested.nesting {
                Nesting::Single => "Block",
                Nesting::List => "Block List",
            };
            lines.push((
                nested.name,
                format!(
                    "- `{}` ({kind}, {section_name}) {} (see [below for nested schema](#nestedblock--{anchor}))",
                    nested.name, nested.block.description
                ),
            ));
        }
        if lines.is_empty() {
            continue;
        }
        lines.sort_by_key(|(name, _)| *name);
        if top {
            let _ = write!(out, "\n### {heading}\n\n");
        } else {
            let _ = write!(out, "\n{heading}:\n\n");
        }
        for (_, line) in lines {
            out.push_str(&line);
            out.push('\n');
        }
    }
    for nested in &block.blocks {
        let inner = if top { nested.name.to_owned() } else { format!("{path}.{}", nested.name) };
        render_block(&nested.block, &inner, out);
    }
}

/// Replaces the page's `## Schema` section (up to the next `## ` heading) with `schema`.
fn with_schema_section(page: &str, schema: &str) -> String {
    let Some(start) = page.find("\n## Schema\n").map(|index| index + 1) else {
        return format!("{}\n\n{schema}", page.trim_end());
    };
    let end = page[start + 1..].find("\n## ").map(|index| start + 1 + index + 1).unwrap_or(page.len());
    format!(
        "{}{}\n{}",
        &page[..start],
        schema.trim_end(),
        if end < page.len() { format!("\n{}", &page[end..]) } else { String::new() }
    )
}

fn skeleton(page: &Page) -> String {
    format!(
        "---\npage_title: \"{name} {kind} - edgible\"\ndescription: |-\n  {description}\n---\n\n# {name} ({kind})\n\n{description}\n",
        name = page.name,
        kind = page.kind,
        description = page.schema.block.description
    )
}

#[test]
fn every_page_lists_exactly_the_schemas_attributes() {
    let write = std::env::var_os(WRITE_ENV).is_some_and(|value| value == "1");
    let mut problems = Vec::new();
    for page in pages() {
        let schema_section = render_schema(&page.schema.block);
        if write {
            let existing = std::fs::read_to_string(&page.path).unwrap_or_else(|_| skeleton(&page));
            if let Some(parent) = page.path.parent() {
                std::fs::create_dir_all(parent).expect("creating the docs directory");
            }
            std::fs::write(&page.path, with_schema_section(&existing, &schema_section)).expect("writing a doc page");
        }
        let Ok(markdown) = std::fs::read_to_string(&page.path) else {
            problems.push(format!("{} has no page at {}", page.name, page.path.display()));
            continue;
        };
        let mut expected = BTreeSet::new();
        expected_entries(&page.schema.block, "", &mut expected);
        let listed = listed_entries(&markdown);
        let missing: Vec<&Entry> = expected.difference(&listed).collect();
        let extra: Vec<&Entry> = listed.difference(&expected).collect();
        if !missing.is_empty() || !extra.is_empty() {
            problems.push(format!(
                "{} ({}) disagrees with its schema.\n  missing from the page: {missing:?}\n  not in the schema: {extra:?}",
                page.name,
                page.path.display()
            ));
        }
    }
    assert!(
        problems.is_empty(),
        "{}\n\nRun `{WRITE_ENV}=1 cargo test -p terraform-provider-edgible --test docs` to regenerate the schema sections.",
        problems.join("\n\n")
    );
}

#[test]
fn the_check_catches_a_renamed_attribute() {
    let page = pages().into_iter().find(|page| page.name == "edgible_device_pool").expect("the pool page");
    let rendered = render_schema(&page.schema.block);
    let mut expected = BTreeSet::new();
    expected_entries(&page.schema.block, "", &mut expected);
    assert_eq!(listed_entries(&rendered), expected, "a rendered section lists exactly the schema");
    let renamed = rendered.replace("`tunnel_cidr`", "`cidr`");
    assert_ne!(listed_entries(&renamed), expected);
}

#[test]
fn every_resource_has_an_example_and_an_import_section() {
    for page in pages().into_iter().filter(|page| page.kind == "Resource") {
        let markdown = std::fs::read_to_string(&page.path).unwrap_or_default();
        assert!(markdown.contains("## Example Usage"), "{} has no example", page.path.display());
        assert!(
            markdown.contains(&format!("terraform import {}.", page.name)),
            "{} has no import section",
            page.path.display()
        );
        let example =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/terraform").join(short(&page.name)).join("main.tf");
        assert!(example.is_file(), "{} has no example configuration at {}", page.name, example.display());
    }
}
