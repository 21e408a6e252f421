"""Jobs: what a user asks for (back up these sources with these writers), run over the lower layers."""
