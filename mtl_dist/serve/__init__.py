"""The model after training: export (``.pt``, ``.pt2``, AOTInductor packages), the served
program and batch scoring.

May import every stage below it: config … observe (never train or tools).
"""
