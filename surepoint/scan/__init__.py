"""Looking for ransomware in restore points: signals from backup statistics, YARA rules over files."""
