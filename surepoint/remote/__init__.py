"""The server side of ssh:// repositories (`surepoint serve`)."""
