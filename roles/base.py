"""What every host of ours needs: base packages, the service user, our directories."""

from pyinfra import host
from pyinfra.api import deploy
from pyinfra.operations import apt, files

from disagg import settings as S
from roles.ops import service_user

DEFAULTS = {
    # curl: health gates; python3-venv: our venvs
    "base_packages": ["curl", "ca-certificates", "python3-venv"],
}


@deploy("disagg base", data_defaults=DEFAULTS)
def base():
    apt.packages(
        name="Install base packages",
        packages=host.data.get("base_packages"),
        update=True,
        cache_time=3600,
    )
    service_user(S.SERVICE_USER, S.STATE_DIR)
    for path, owner in ((S.CONFIG_DIR, "root"), (S.OPT_DIR, "root"), (S.STATE_DIR, S.SERVICE_USER)):
        files.directory(name=f"Directory {path}", path=path, user=owner, group=owner, mode="755")
