//! `edgible member ...`: the organization's members, and the passwords they log in with on
//! the server's login page (which `organization` access policies send visitors to).
//!
//! A password is never taken from the command line, where other users of the machine and
//! the shell history would see it: it is asked for without echo, or read from stdin with
//! `--password-stdin`.

use std::io::{IsTerminal, Read};

use anyhow::Context as _;
use clap::{Subcommand, ValueEnum};
use edgible::Client;
use edgible::model::{Member, MemberId, MemberSpec, PasswordSpec, Role, Validate};

use crate::Context;
use crate::output::{Details, Format, Table, optional, print_json};

#[derive(Debug, Subcommand)]
pub enum MemberCommand {
    /// List the organization's members.
    List,
    /// Add a user (by e-mail address) to the organization.
    Create {
        email: String,
        #[arg(long, value_enum, default_value_t = RoleArg::Member)]
        role: RoleArg,
        /// The name shown for the user.
        #[arg(long)]
        display_name: Option<String>,
    },
    /// Remove a member from the organization.
    Delete {
        /// E-mail address or member id.
        member: String,
    },
    /// Set the password a member logs in with (10 to 256 characters). Asked for without echo,
    /// or read from stdin with --password-stdin; never taken from the command line.
    SetPassword {
        /// E-mail address or member id.
        member: String,
        /// Read the password from stdin (one trailing newline is dropped).
        #[arg(long)]
        password_stdin: bool,
    },
}

/// A [`Role`] as a command-line value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RoleArg {
    Owner,
    Admin,
    Member,
}

impl From<RoleArg> for Role {
    fn from(role: RoleArg) -> Role {
        match role {
            RoleArg::Owner => Role::Owner,
            RoleArg::Admin => Role::Admin,
            RoleArg::Member => Role::Member,
        }
    }
}

pub fn role_name(role: Role) -> &'static str {
    match role {
        Role::Owner => "owner",
        Role::Admin => "admin",
        Role::Member => "member",
    }
}

pub async fn run(command: MemberCommand, context: &Context) -> anyhow::Result<()> {
    let client = context.client()?;
    match command {
        MemberCommand::List => {
            let members = client.list_all::<Member>().await.context("listing members")?;
            match context.format {
                Format::Json => print_json(&members)?,
                Format::Table => {
                    let mut table = Table::new(&["EMAIL", "ID", "ROLE", "NAME"]);
                    for member in &members {
                        table.row(vec![
                            member.spec.email.clone(),
                            member.id.to_string(),
                            role_name(member.spec.role).to_owned(),
                            optional(member.spec.display_name.as_ref()),
                        ]);
                    }
                    table.print();
                }
            }
        }
        MemberCommand::Create { email, role, display_name } => {
            let spec = MemberSpec { email: email.clone(), display_name, role: role.into() };
            spec.validate().with_context(|| format!("invalid member {email}"))?;
            let member: Member =
                client.create::<Member>(&spec).await.with_context(|| format!("adding member {email}"))?;
            match context.format {
                Format::Json => print_json(&member)?,
                Format::Table => println!(
                    "Added {email} ({}) as {}. Set a password with `edgible member set-password {email}`.",
                    member.id,
                    role_name(member.spec.role)
                ),
            }
        }
        MemberCommand::Delete { member } => {
            let member = find_member(&client, &member).await?;
            client.delete::<Member>(&member.id).await.with_context(|| format!("removing {}", member.spec.email))?;
            println!("Removed {} ({}) from the organization.", member.spec.email, member.id);
        }
        MemberCommand::SetPassword { member, password_stdin } => {
            // The password first: a prompt should not wait behind a slow server, and a bad
            // password is refused before anything is looked up.
            let password = if password_stdin { read_stdin()? } else { prompt()? };
            let spec = PasswordSpec { password };
            spec.validate().context("invalid password")?;
            let member = find_member(&client, &member).await?;
            client
                .set_member_password(&member.id, &spec)
                .await
                .with_context(|| format!("setting the password of {}", member.spec.email))?;
            match context.format {
                Format::Json => print_json(&member)?,
                Format::Table => {
                    Details::new().field("password set for", &member.spec.email).field("member id", member.id).print()
                }
            }
        }
    }
    Ok(())
}

/// The member with this id or e-mail address (compared without case, as mail servers do for
/// the domain and most do for the rest).
async fn find_member(client: &Client, reference: &str) -> anyhow::Result<Member> {
    if let Ok(id) = reference.parse::<MemberId>() {
        match client.get::<Member>(&id).await {
            Ok(member) => return Ok(member),
            Err(error) if error.is_not_found() => {}
            Err(error) => return Err(anyhow::Error::new(error).context(format!("looking up member {reference}"))),
        }
    }
    let members = client.list_all::<Member>().await.context("listing members")?;
    members
        .into_iter()
        .find(|member| member.spec.email.eq_ignore_ascii_case(reference.trim()))
        .with_context(|| format!("no member of the organization has the e-mail address or id {reference:?}"))
}

/// The password piped in: everything but one trailing newline (`echo` and here-strings add
/// one; spaces are kept, they may be part of the password).
fn password_from_stdin(text: &str) -> String {
    let text = text.strip_suffix('\n').unwrap_or(text);
    text.strip_suffix('\r').unwrap_or(text).to_owned()
}

fn read_stdin() -> anyhow::Result<String> {
    let mut text = String::new();
    std::io::stdin().lock().read_to_string(&mut text).context("reading the password from stdin")?;
    Ok(password_from_stdin(&text))
}

/// Asks twice without echo, so a typo does not lock the member out.
fn prompt() -> anyhow::Result<String> {
    anyhow::ensure!(
        std::io::stdin().is_terminal(),
        "stdin is not a terminal to ask for the password on; pipe it in with --password-stdin"
    );
    let password = rpassword::prompt_password("New password: ").context("reading the password")?;
    let again = rpassword::prompt_password("Repeat it: ").context("reading the password")?;
    anyhow::ensure!(password == again, "the two passwords differ; nothing was changed");
    Ok(password)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_trailing_newline_is_dropped_and_nothing_else() {
        assert_eq!(password_from_stdin("correct horse\n"), "correct horse");
        assert_eq!(password_from_stdin("correct horse\r\n"), "correct horse");
        assert_eq!(password_from_stdin(" spaced out \n"), " spaced out ");
        assert_eq!(password_from_stdin("no newline"), "no newline");
        assert_eq!(password_from_stdin("two\n\n"), "two\n");
    }
}
