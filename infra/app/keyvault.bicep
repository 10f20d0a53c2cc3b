// Key Vault (RBAC authorization, no access policies) holding the scoring proxy's keys. The Function App reads
// them through a Key Vault reference in PROXY_API_KEYS, resolved with its user-assigned identity.
// Static analysis: checkov (make test) reads this file. A check it would fail on purpose is suppressed inside the
// resource, next to the setting it is about, by a `// checkov:skip=<id>: <reason>` line (checkov reads the
// suppressions of a Bicep resource from the lines of its body only).
@description('Name of the vault (3-24 characters).')
@minLength(3)
@maxLength(24)
param name string

@description('Region of the vault.')
param location string = resourceGroup().location

@description('Tags of the vault.')
param tags object = {}

@secure()
@description('Comma-separated keys the scoring proxy accepts.')
param proxyApiKeys string

@description('Name of the secret holding proxyApiKeys.')
param proxyKeysSecretName string = 'proxy-api-keys'

@description('Principal id of the app\'s user-assigned identity (gets Key Vault Secrets User).')
param appPrincipalId string

@description('Principal id of the deploying user; empty = none. Gets Key Vault Secrets User to read the proxy key.')
param userPrincipalId string = ''

@allowed([
  'User'
  'ServicePrincipal'
])
@description('Kind of principal that userPrincipalId is.')
param userPrincipalType string = 'User'

var secretsUserRoleId = '4633458b-17de-408a-b874-0445c86b69e6' // Key Vault Secrets User

// Soft delete with purge protection: a deleted vault (and its secret) can be recovered for 7 days and cannot be
// purged before. `azd down --purge` leaves such a vault alone (it purges only vaults without purge protection),
// so its name stays taken for those 7 days; the README's tear-down step says how to provision again sooner.
// Purge protection can never be turned off once on.
//
// Public network access, no firewall: the Flex Consumption app has no virtual network, so it resolves the Key
// Vault reference over the public endpoint (App Service is not a trusted service that the firewall's
// AzureServices bypass lets through), and so does the deploying user's `az keyvault secret show`.
// Every request still needs an Entra ID token and an RBAC role on this vault (Key Vault Secrets User, below).
resource vault 'Microsoft.KeyVault/vaults@2023-07-01' = {
  name: name
  location: location
  tags: tags
  properties: {
    tenantId: tenant().tenantId
    sku: {
      family: 'A'
      name: 'standard'
    }
    enableRbacAuthorization: true
    enableSoftDelete: true
    softDeleteRetentionInDays: 7
    enablePurgeProtection: true
    // checkov:skip=CKV_AZURE_189: no virtual network: the app resolves its Key Vault reference over the public endpoint
    // checkov:skip=CKV_AZURE_109: no firewall for the same reason (App Service is not a trusted service); RBAC only
    publicNetworkAccess: 'Enabled'
  }
}

// No expiry date: the proxy keys are API keys the operator rotates by hand (README, "Rotate the proxy key": two
// comma-separated keys overlap, then the old one goes). An `exp` attribute would not rotate anything; where Key
// Vault enforces it (`SecretExpired`), the app's Key Vault reference would stop resolving on that date.
resource proxyKeys 'Microsoft.KeyVault/vaults/secrets@2023-07-01' = {
  parent: vault
  name: proxyKeysSecretName
  properties: {
    value: proxyApiKeys
    contentType: 'text/plain'
    // checkov:skip=CKV_AZURE_41: rotated by hand with overlapping keys; an expiry date would only break the reference
  }
}

resource appSecretsUser 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(vault.id, appPrincipalId, secretsUserRoleId)
  scope: vault
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', secretsUserRoleId)
    principalId: appPrincipalId
    principalType: 'ServicePrincipal'
  }
}

resource userSecretsUser 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (!empty(userPrincipalId)) {
  name: guid(vault.id, userPrincipalId, secretsUserRoleId)
  scope: vault
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', secretsUserRoleId)
    principalId: userPrincipalId
    principalType: userPrincipalType
  }
}

output name string = vault.name
output proxyKeysSecretName string = proxyKeys.name
// Versionless, so a rotated secret is picked up without redeploying.
output proxyKeysSecretUri string = proxyKeys.properties.secretUri
