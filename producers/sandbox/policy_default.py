"""The policy `agentledger sandbox run` applies when none is given (--policy / $AGENTLEDGER_SANDBOX_POLICY).

Fail-safe defaults: only the workspace is writable, secrets are hidden and filtered from the
environment, there is no network, and leaving the sandbox needs an approval.
"""

DEFAULT_POLICY_SOURCE = "builtin:agentledger-sandbox-default"

DEFAULT_POLICY_TOML = """\
name = "agentledger-sandbox-default"

[sandbox]
mode = "workspace_write"
writable_roots = ["$WORKSPACE"]
deny_read = ["~/.ssh/**", "~/.aws/**", "~/.gnupg/**", "~/.kube/**", "~/.config/gcloud/**",
             "~/.docker/config.json", "~/.netrc", "~/.git-credentials", "~/.pypirc", "~/.npmrc"]

[sandbox.env]
allow = ["PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "LANGUAGE", "LC_*", "TERM", "TZ", "CI",
         "PYTHONHASHSEED", "PYTHONDONTWRITEBYTECODE", "PYTHONUTF8", "PYTHONIOENCODING", "SOURCE_DATE_EPOCH"]
deny = ["*TOKEN*", "*SECRET*", "*PASSWORD*", "*PASSWD*", "*CREDENTIAL*", "*API_KEY*", "*PRIVATE_KEY*",
        "AWS_*", "GOOGLE_APPLICATION_CREDENTIALS", "SSH_AUTH_SOCK"]

[network]
default = "deny"

[approvals]
default = "allow"
escalation = "prompt"
noninteractive = "deny"
timeout_s = 60

[[approvals.rules]]
id = "no-privilege-escalation"
decision = "forbidden"
prefix = [["sudo", "su", "doas", "pkexec"]]
"""
