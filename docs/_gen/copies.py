"""Files outside docs/ that the site shows as pages, copied in at build time: {path under docs/: source, relative
to the repository root}. Pages link to the copy, so the strict build checks those links like any other."""

from __future__ import annotations

COPIES = {
    # The deployment commands stay beside the deployment files; the operations pages link to this copy.
    "operations/deploy-commands.md": "deploy/README.md",
}
