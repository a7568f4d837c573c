"""detectors/clt"""
