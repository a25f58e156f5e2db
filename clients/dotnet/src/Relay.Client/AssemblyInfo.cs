using System.Runtime.CompilerServices;

// The test driver checks the frame decoder directly (clients/dotnet/tests). Title and
// version come from Relay.Client.csproj.
[assembly: InternalsVisibleTo("RelayDriver")]
