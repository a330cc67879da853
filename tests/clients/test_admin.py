"""The admin client against the real server on the tiny model."""

import tarfile

import pytest

from clients.admin import SwapserveAdmin, SwapserveError
from tests.tiny_model import build_lora_adapter


def test_register_upload_list_delete(tiny_server, tiny_model_path, tmp_path):
    adapter = build_lora_adapter(tiny_model_path, tmp_path / "ad")
    archive = tmp_path / "ad.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(adapter, arcname="ad")
    with SwapserveAdmin(tiny_server.url) as admin:
        assert admin.ready()["status"] == "ready"
        info = admin.register_adapter("client-a", adapter)
        assert info["rank"] == 4
        assert admin.upload_adapter("client-b", archive)["name"] == "client-b"
        assert {"client-a", "client-b"} <= {a["name"] for a in admin.list_adapters()}
        with pytest.raises(SwapserveError) as err:
            admin.register_adapter("client-a", adapter)
        assert err.value.status == 409 and err.value.code == "adapter_exists"
        assert admin.delete_adapter("client-a")["deleted"] is True
        assert admin.delete_adapter("client-b")["deleted"] is True
        with pytest.raises(SwapserveError) as err:
            admin.get_adapter("client-a")
        assert err.value.status == 404
