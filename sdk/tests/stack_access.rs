//! Access policies in stack files: they parse into the application's `access`, several
//! policies combine, and a mistake inside `access` is reported at its exact path and line.

use edgible::model::Role;
use edgible::stack::Stack;

const STACK: &str = "\
applications:
  - name: wiki
    hostnames: [wiki.example.test]
    port: 3000
    workload:
      process:
        command: /usr/bin/wiki
    access:
      organization:
        roles: [admin]
      api_key: {}
      short_code:
        code: letmein2030
";

#[test]
fn several_policies_parse_into_one_access() {
    let stack = Stack::parse(STACK).unwrap();
    let access = &stack.applications[0].spec.access;
    assert_eq!(access.organization.as_ref().map(|organization| organization.roles.clone()), Some([Role::Admin].into()));
    assert!(access.api_key.is_some());
    assert_eq!(access.short_code.as_ref().and_then(|short_code| short_code.code.as_deref()), Some("letmein2030"));
    assert!(!access.is_public());
}

#[test]
fn an_unknown_policy_is_named_with_its_path_and_line() {
    let error = Stack::parse(&STACK.replace("      api_key: {}\n", "      api_keys: {}\n")).unwrap_err();
    assert_eq!(error.field.as_deref(), Some("applications[0].access.api_keys"), "{error}");
    assert_eq!(error.line, Some(11), "{error}");
    assert!(error.message.contains("unknown field `api_keys`"), "{error}");
}

#[test]
fn a_wrong_field_inside_a_policy_is_named_with_its_path() {
    let error = Stack::parse(&STACK.replace("        roles: [admin]\n", "        roles: [admin, root]\n")).unwrap_err();
    assert!(error.field.as_deref().is_some_and(|field| field.starts_with("applications[0].access.organization.roles")));
    assert_eq!(error.line, Some(10), "{error}");

    let error = Stack::parse(&STACK.replace("      api_key: {}\n", "      api_key: {header: X-Key}\n")).unwrap_err();
    assert_eq!(error.field.as_deref(), Some("applications[0].access.api_key.header"), "{error}");

    let error = Stack::parse(&STACK.replace("code: letmein2030", "code: no")).unwrap_err();
    assert_eq!(error.field.as_deref(), Some("applications[0].access.short_code.code"), "{error}");
    assert_eq!(error.line, Some(13), "{error}");
    assert!(error.message.contains("6-64 letters and digits"), "{error}");

    let error = Stack::parse(
        &STACK
            .replace("      short_code:\n        code: letmein2030\n", "      short_code:\n        expires_at: soon\n"),
    )
    .unwrap_err();
    assert_eq!(error.field.as_deref(), Some("applications[0].access.short_code.expires_at"), "{error}");
}
