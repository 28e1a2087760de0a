"""The `toolkit` group: one line and exit status 2 for every user error, and commands from plugins."""

from __future__ import annotations

import sys

import click

from toolkit.cli.common import os_error, rank_prefix
from toolkit.errors import ToolkitError


def _leave_process_group() -> None:
    """A rank that stops on an error leaves its process group before the interpreter exits: left to the
    interpreter's teardown, gloo's threads can abort the process (SIGABRT) instead of exit status 2."""
    dist = sys.modules.get("torch.distributed")
    try:
        if dist is not None and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - leaving is best effort; the exit status is already decided
        pass


class ToolkitGroup(click.Group):
    """Turns a user error (ours or click's) into one line on stderr and exit status 2; looks up the commands
    that plugins add (``register_commands``) only for a name that is not built in."""

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        command = super().get_command(ctx, name)
        if command is not None or ctx.parent is not None:
            return command
        from toolkit.registry import get_registry

        entry = get_registry().commands.get(name)
        return entry.command if entry is not None else None

    def list_commands(self, ctx: click.Context) -> list[str]:
        from toolkit.registry import get_registry

        return sorted({*super().list_commands(ctx), *get_registry().commands})

    def main(self, args=None, prog_name=None, **extra):  # type: ignore[override]
        try:
            return self._main(args, prog_name, **extra)
        finally:
            _leave_process_group()

    def _main(self, args, prog_name, **extra):
        try:
            return super().main(args=args, prog_name=prog_name, standalone_mode=False, **extra)
        except click.exceptions.Exit as exc:
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("aborted", err=True)
            sys.exit(130)
        except click.ClickException as exc:  # click's own messages may span lines (a list of choices)
            message = " ".join(line.strip() for line in exc.format_message().splitlines() if line.strip())
            click.echo(f"{rank_prefix()}error: {message}", err=True)
            sys.exit(2)
        except ToolkitError as exc:
            click.echo(f"{rank_prefix()}error: {exc}", err=True)
            sys.exit(2)
        except OSError as exc:  # a full disk, a read-only folder, a directory where a file should go...
            click.echo(f"{rank_prefix()}error: {os_error(exc)}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
        except Exception as exc:  # noqa: BLE001 - a bug, ours or a plugin's: one line unless asked for more
            import os

            from toolkit.distributed import peer_failure

            if os.environ.get("TOOLKIT_DEBUG", "").strip() not in ("", "0"):
                raise
            text = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
            if peer_failure(exc):
                click.echo(f"{rank_prefix()}error: another rank of this run stopped (it died, was killed or hangs), "
                           f"so this rank stops too; see the other ranks' output ({text[:160]})", err=True)
                sys.exit(1)
            click.echo(f"{rank_prefix()}error: internal error: {type(exc).__name__}"
                       f"{': ' + text if text else ''} (TOOLKIT_DEBUG=1 shows the traceback)", err=True)
            sys.exit(1)


@click.group(cls=ToolkitGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="diffusion-toolkit", prog_name="toolkit")
def cli() -> None:
    """Denoising diffusion models as composable plugins (DDPM, DDIM, guidance, latent, ONNX)."""
    from toolkit.allocator import tune_allocator

    tune_allocator()  # a sampling or training loop frees and refaults the same buffers every step otherwise


def main() -> None:
    cli(prog_name="toolkit")
