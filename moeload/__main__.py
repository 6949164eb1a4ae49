from moeload.cli import main

main()
